"""Training metrics: one file per kind of record (train, valid, intervention), read back the same way,
the console line of a step, and a step's throughput (real tokens/s, MFU, HFU against the device peak)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from glm130b.core.atomic import atomic_write_text
from glm130b.model.config import GLMConfig
from glm130b.model.flops import training_flops
from glm130b.model.masks import visible_pairs
from glm130b.objective.batch import TrainingBatch

# Dense bf16/fp16 tensor-core peak of one device (datasheet, SXM parts), for MFU.
PEAK_FLOPS_BY_DEVICE = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def device_peak_flops(device: torch.device, configured: float | None) -> float | None:
    """`configured` when given, else the datasheet peak of a known GPU; None (no MFU) otherwise."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_FLOPS_BY_DEVICE.items():
            if key in name:
                return peak
    return None  # CPU and unknown GPUs: MFU not printed


def batch_work(batches: list[TrainingBatch]) -> torch.Tensor:
    """float64 [real (non-pad) tokens, visible (query, key) pairs] of `batches`: what MFU counts."""
    tokens = sum(int((b.segment_ids != 0).sum()) for b in batches)
    pairs = sum(visible_pairs(b.segment_ids, b.in_prefix) for b in batches)
    return torch.tensor([tokens, pairs], dtype=torch.float64)


def throughput(
    config: GLMConfig, work: torch.Tensor, seconds: float, peak_flops: float | None, devices: int, recompute: bool
) -> dict:
    """tokens/s (real tokens), and with a known peak MFU (model FLOPs: real tokens, visible pairs)
    and HFU (the same plus the blocks' recomputed forward when `recompute`), per device."""
    tokens, pairs = (int(x) for x in work.tolist())
    record = {"tokens_per_s": tokens / seconds, "mfu": None, "hfu": None}
    if peak_flops:
        for key, again in (("mfu", False), ("hfu", recompute)):
            record[key] = training_flops(config, tokens, pairs, recompute=again) / seconds / peak_flops / devices
    return record


class MetricsLog:
    """One file per kind of record (`train`, `valid`, `intervention`) in JSON lines or CSV, appended
    across resumes; TensorBoard scalars as well when it is installed and wanted."""

    def __init__(self, directory: Path, fmt: str, tensorboard: bool, enabled: bool = True):
        """enabled=False (ranks other than 0 of a distributed run): every write is dropped."""
        self.directory, self.fmt, self.enabled = directory, fmt, enabled
        self.writer = None
        if not enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(directory / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def write(self, kind: str, record: dict) -> None:
        if not self.enabled:
            return
        path = self.directory / f"{kind}.{self.fmt}"
        with path.open("a") as f:
            f.write(self._text([record], header=not path.exists() or path.stat().st_size == 0))
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, record["step"])

    def forget_after(self, step: int) -> None:
        """Drop the records of steps after `step`: a run resumed from the checkpoint of `step` logs
        them again, and an interrupted step must not appear twice. TensorBoard's events of those
        steps are purged as its writer reopens."""
        if not self.enabled:
            return
        for path in self.directory.glob(f"*.{self.fmt}"):
            records = read_metrics(self.directory, path.stem)
            kept = [r for r in records if r["step"] <= step]
            if len(kept) == len(records):
                continue
            atomic_write_text(path, self._text(kept, header=True, columns=records[0]))
        if self.writer is not None:
            from torch.utils.tensorboard import SummaryWriter  # present: the writer was made with it

            self.writer.close()
            self.writer = SummaryWriter(str(self.directory / "tensorboard"), purge_step=step + 1)

    def _text(self, records: list[dict], header: bool, columns: dict | None = None) -> str:
        """Lines of `records` in the log's format; a CSV file starts with a header of the keys of
        `columns` (default: the first record's)."""
        if self.fmt == "jsonl":
            return "".join(json.dumps(r) + "\n" for r in records)
        lines = [",".join(_csv_cell(v) for v in r.values()) for r in records]
        if header:
            lines.insert(0, ",".join(columns or records[0]))
        return "".join(line + "\n" for line in lines)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(directory: str | Path, kind: str) -> list[dict]:
    """The records of one kind, from whichever format the run wrote."""
    directory = Path(directory)
    if (directory / f"{kind}.jsonl").exists():
        return [json.loads(line) for line in (directory / f"{kind}.jsonl").read_text().splitlines() if line]
    if (directory / f"{kind}.csv").exists():
        with (directory / f"{kind}.csv").open() as f:
            return [{k: _csv_value(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return []


def _csv_cell(value) -> str:
    text = "" if value is None else str(value)
    return '"' + text.replace('"', '""') + '"' if ("," in text or '"' in text) else text


def _csv_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text or None


def format_record(record: dict) -> str:
    text = (
        f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
        f"grad norm {record['grad_norm']:.3f} | loss scale {record['loss_scale']:g} | "
        f"{record['tokens_per_s']:,.0f} tokens/s"
    )
    if record["mfu"] is not None:
        text += f" | MFU {100 * record['mfu']:.1f} % | HFU {100 * record['hfu']:.1f} %"
    return text
