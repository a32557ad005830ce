"""Bring your own model and data: DCM for a small CNN of your own, trained by dcmkd's loop from
plain PyTorch DataLoaders (the bundled digits), then exported as your own class."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dcmkd
from dcmkd.data import load_digits_dataset


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


def digits(train: bool, subset: int | None = None) -> TensorDataset:
    """The bundled digits as a plain dataset of normalised float images (any dataset works)."""
    x, y, _ = load_digits_dataset(train, size=16)
    x = x.float() / 255
    x = (x - 0.5) / 0.25
    return TensorDataset(x[:subset], y[:subset])


def main(epochs: int = 5, train_subset: int | None = None, out: str = "runs/byo") -> float:
    torch.manual_seed(0)
    train = DataLoader(digits(True, train_subset), batch_size=32, shuffle=True, drop_last=True)
    test = DataLoader(digits(False), batch_size=256)
    nets = [dcmkd.wrap_model(SmallCNN(), sample_input=(2, 3, 16, 16)) for _ in range(2)]
    print("auxiliary classifiers tap", nets[0].taps)  # {'C2': 'features.1', 'C3': 'features.0'}
    method = dcmkd.create_method("dcm", nets)
    settings = dcmkd.TrainSettings(schedule=dcmkd.Schedule("cosine", lr=0.1, epochs=epochs),
                                   device="cpu", quiet=True)
    summary = dcmkd.fit(method, train, out, settings, test=test)   # resumable, like any run
    model = SmallCNN()   # a plain SmallCNN: the export has no auxiliary weights
    model.load_state_dict(torch.load(f"{out}/{summary['exported'][0]}", weights_only=True))
    model.eval()
    with torch.no_grad():
        hits = torch.cat([model(x).argmax(1) == y for x, y in test])
    print(f"net 1 test accuracy after {epochs} epochs of DCM: {hits.float().mean():.1%} "
          f"(the run's own evaluation: {100 - summary['test_top1'][0]:.1f}%)")
    return hits.float().mean().item()


if __name__ == "__main__":
    main()
