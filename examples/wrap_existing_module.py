"""Wrap a LightningModule that knows nothing of lightning_fastif, in a few lines.

The module below has its own training_step, optimizer and data module, as yours does. Influence needs only:
a FeatureIndexCallback during fit (or its ``build`` method afterwards), and an InfluenceModule around the trained model.

Run: ``python examples/wrap_existing_module.py``
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_fastif as lf


# ----------------------------------------------------------------------------- your code, unchanged
class BlobsData(pl.LightningDataModule):
    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(4, 10, generator=g) * 3
        y = torch.randint(0, 4, (1200,), generator=g)
        x = centers[y] + torch.randn(1200, 10, generator=g) * 1.5
        self.train, self.test = TensorDataset(x[:1000], y[:1000]), TensorDataset(x[1000:], y[1000:])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=32, shuffle=True)


class MyClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
        self.classifier = nn.Linear(16, 4)

    def forward(self, x):
        return self.classifier(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=1e-2)


# ----------------------------------------------------------------------------- the few lines of influence
def main() -> None:
    pl.seed_everything(0)
    data, model = BlobsData(), MyClassifier()
    index = lf.FeatureIndexCallback("outputs/example_wrap/index")  # 1. index the features at the end of fit
    pl.Trainer(max_epochs=10, callbacks=[index], logger=False, enable_checkpointing=False).fit(model, data)

    im = lf.InfluenceModule(  # 2. wrap the trained model as it is
        model,
        data.train,
        solver=lf.ExactSolver(damping=1e-2),
        num_candidates=200,
        top_k=5,
        index="outputs/example_wrap/index",
    )
    trainer = pl.Trainer(
        inference_mode=False, logger=False, callbacks=[lf.InfluenceWriter("outputs/example_wrap")]
    )
    results = trainer.predict(im, DataLoader(Subset(data.test, range(4)), batch_size=4))  # 3. ask
    for r in results[0]:
        print(
            f"query {r.query_id} (label {r.label}, predicted {r.prediction}): helpful {r.helpful_ids}, "
            f"harmful {r.harmful_ids}"
        )
        for flag in r.flags:  # e.g. why a list is empty
            print(f"    {flag}")


if __name__ == "__main__":
    main()
