"""Names that docs/torch.md takes as given: a small classifier with a `.head`, a loader, an optimiser."""

import torch
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(1)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


model = Classifier()
loader = [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(4)]
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
