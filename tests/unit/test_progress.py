"""Progress in piped logs: plain lines instead of tqdm's carriage returns, and the rich training bar
counting steps of max_steps instead of "Epoch 4/-2"."""

from __future__ import annotations

import io
import logging

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel
from tqdm.std import tqdm as std_tqdm

from segldm.config.progress import LineProgress, tqdm
from segldm.training.callbacks import StepProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_piped_bar_prints_a_line_every_10_percent_and_at_the_end(monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # no logging set up: lines to the stream
    out = io.StringIO()
    with tqdm(total=37, desc="generating", unit="img", file=out) as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(37):
            bar.update(1)
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 11  # 0 %, each further 10 %, 100 %
    assert lines[0].startswith("generating:   0% 0/37")
    assert lines[-1].startswith("generating: 100% 37/37 [") and "img/s" in lines[-1]


def test_a_piped_bar_prints_on_time_without_a_total_and_goes_to_the_log(caplog):
    with caplog.at_level(logging.INFO, logger="segldm.progress"):
        for _ in tqdm(iter(range(3)), desc="segmenting", file=io.StringIO(), every_n_seconds=0.0):
            pass
    messages = [r.getMessage() for r in caplog.records if r.name == "segldm.progress"]
    assert [m.split(" [")[0] for m in messages] == [f"segmenting: {n}it" for n in range(4)]


def test_a_terminal_keeps_tqdms_bar_and_disabled_stays_silent():
    out = Terminal()
    with tqdm(total=3, file=out) as bar:
        assert isinstance(bar, std_tqdm) and not isinstance(bar, LineProgress)
        bar.update(3)
    assert "\r" in out.getvalue()
    silent = io.StringIO()
    with tqdm(total=3, file=silent, disable=True) as bar:
        bar.update(3)
    assert silent.getvalue() == ""


def rendered(max_steps: int, max_epochs: int) -> str:
    bar = StepProgressBar(
        console_kwargs={"force_terminal": True, "record": True, "width": 120, "file": io.StringIO()}
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar],
    )
    trainer.fit(BoringModel())
    return bar._console.export_text()


def test_the_training_bar_counts_steps_when_training_is_measured_in_steps():
    text = rendered(max_steps=6, max_epochs=-1)  # two epochs of 4 batches, stopped at step 6
    assert "/-2" not in text and "/4 " not in text and "/2 " not in text  # no epoch's batch count
    assert "Epoch 1 · step" in text and "6/6" in text
    epochs = rendered(max_steps=-1, max_epochs=1)  # an epoch limit: the stock bar
    assert "Epoch 0/0" in epochs and "4/4" in epochs
