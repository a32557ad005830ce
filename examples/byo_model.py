"""Bring your own model: DCM for a small CNN of your own on the bundled digits, then export."""
from __future__ import annotations

import torch
from torch import nn

import dcmkd
from dcmkd.data import DataConfig, build_data


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())
        self.features = nn.Sequential(block(3, 8, 1), block(8, 16, 2), block(16, 32, 2))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def main(epochs: int = 5, train_subset: int | None = None, out: str = "small_cnn.pt") -> float:
    torch.manual_seed(0)
    data = build_data(DataConfig(name="digits", batch_size=32, train_subset=train_subset))
    nets = [dcmkd.wrap_model(SmallCNN(), sample_input=(2, 3, 16, 16)) for _ in range(2)]
    print("auxiliary classifiers tap", nets[0].taps)  # {'C2': 'features.1', 'C3': 'features.0'}
    opt = torch.optim.SGD([p for n in nets for p in n.parameters()], lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        for x, y in data.train.epoch(epoch):
            losses = dcmkd.dcm_loss([net(x) for net in nets], y)  # one loss per network
            opt.zero_grad()
            sum(losses).backward()
            opt.step()
    torch.save(nets[0].export().state_dict(), out)  # a plain SmallCNN: no auxiliary weights
    model = SmallCNN()
    model.load_state_dict(torch.load(out))
    model.eval()
    with torch.no_grad():
        hits = torch.cat([model(x).argmax(1) == y for x, y in data.test.epoch(0)])
    print(f"net 1 test accuracy after {epochs} epochs of DCM: {hits.float().mean():.1%}")
    return hits.float().mean().item()

if __name__ == "__main__":
    main()
