"""Weighted k-nearest-neighbour monitor on normalised features (Wu et al. 2018, as in SimCLR code)."""
import torch


@torch.no_grad()
def knn_predict(features, bank, bank_labels, num_classes, k=200, temperature=0.5, chunk=1024):
    """features: NxD and bank: MxD, unit length; bank_labels: M. Returns N predicted labels.

    Each of the k most similar bank entries votes for its label with weight exp(sim / t).
    """
    k = min(k, len(bank))
    preds = []
    for s in range(0, len(features), chunk):
        sim = features[s:s + chunk] @ bank.t()                   # CxM
        top_sim, top_idx = sim.topk(k, dim=1)                    # Cxk
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)
