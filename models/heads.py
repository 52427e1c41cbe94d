"""Downstream classifier trained on frozen encoder features."""
import torch.nn as nn


class DownstreamClassifier(nn.Module):
    """Linear(d, h1) -> ReLU -> Dropout(0.5) -> Linear(h1, h2) -> ReLU -> Linear(h2, classes)."""

    def __init__(self, in_dim, num_classes, hidden1=512, hidden2=256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden1), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                 nn.Linear(hidden1, hidden2), nn.ReLU(inplace=True),
                                 nn.Linear(hidden2, num_classes))

    def forward(self, x):
        return self.net(x)
