"""ACC, ASR and ASR excluding target-class images on a hand-made prediction set."""
import math

from models.metrics import backdoor_metrics


def test_hand_made_predictions():
    labels = [0, 1, 2, 3, 3, 1, 0, 2, 3, 1]          # target 3 is the true label of 3 images
    clean = [0, 1, 2, 3, 0, 1, 0, 0, 3, 2]           # 7 of 10 right
    triggered = [3, 3, 2, 3, 3, 1, 0, 3, 3, 0]       # 6 of 10 hit the target, 3 of them target-class
    m = backdoor_metrics(clean, triggered, labels, target=3)
    assert math.isclose(m["acc"], 70.0)
    assert math.isclose(m["asr"], 60.0)
    assert math.isclose(m["asr_excluding_target"], 100.0 * 3 / 7)


def test_weighted_knn_votes_by_similarity():
    import torch

    from models.knn import knn_predict
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])          # labels 0, 0, 1
    labels = torch.tensor([0, 0, 1])
    queries = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    # k=3, t=0.5: query 0 gives class 0 weight e^1.2 + e^1.92 = 10.1 and class 1 e^1.6 = 4.95.
    assert knn_predict(queries, bank, labels, 2, k=3, temperature=0.5).tolist() == [0, 1]
    # k=1 keeps only the nearest: (0.8, 0.6) for query 0.
    assert knn_predict(queries, bank, labels, 2, k=1, temperature=0.5).tolist() == [0, 1]
    assert knn_predict(torch.tensor([[0.1, 0.995]]), bank, labels, 2, k=1).tolist() == [1]
