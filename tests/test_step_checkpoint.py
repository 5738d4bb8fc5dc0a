"""StepCheckpoint saves the final step and refreshes last.ckpt through public Lightning API."""
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ldm.callbacks import StepCheckpoint


class Linear(pl.LightningModule):
    """The smallest model Lightning trains: one linear layer, SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)  # 4 batches an epoch


def fit(tmp_path, ckpt_path=None, **limits) -> StepCheckpoint:
    pl.seed_everything(0)
    cb = StepCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3,
                        save_top_k=-1, save_last=True, enable_version_counter=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb], **limits)
    trainer.fit(Linear(), ckpt_path=ckpt_path)
    return cb


def step_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_final_step_between_intervals_is_saved(tmp_path):
    cb = fit(tmp_path, max_steps=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=3.ckpt",
                                                          "step=5.ckpt"]
    assert step_of(tmp_path / "last.ckpt") == step_of(tmp_path / "step=5.ckpt") == 5
    assert cb.last_model_path == str(tmp_path / "last.ckpt")


@pytest.mark.parametrize("max_epochs, expected", [(1, 4), (2, 8)])
def test_last_is_refreshed_when_epochs_end_training(tmp_path, max_epochs, expected):
    fit(tmp_path, max_epochs=max_epochs)
    assert step_of(tmp_path / "last.ckpt") == expected
    steps = sorted(step_of(p) for p in tmp_path.glob("step=*.ckpt"))
    assert steps == [s for s in (3, 6) if s <= expected]  # no extra interval file


def test_resuming_a_finished_run_writes_nothing(tmp_path):
    fit(tmp_path, max_steps=5)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    fit(tmp_path, ckpt_path=str(tmp_path / "last.ckpt"), max_steps=5)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
