"""Run logging names: TensorBoard groups train metrics under `train/` (eval under `eval/`), while
metrics.jsonl keeps the plain record keys."""

import json
import struct

from tensorboardX.proto import event_pb2

from jaxpost import configs
from jaxpost.train.metrics import MetricsWriter, dashboard_tag


def _tensorboard_tags(logdir) -> set:
  """Scalar tags in TensorBoard event files (TFRecord: u64 length, u32 crc, data, u32 crc)."""
  tags = set()
  for path in logdir.glob("events.out.tfevents.*"):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      tags |= {v.tag for v in event.summary.value}
      offset += 12 + length + 4
  return tags


def test_dashboard_tags():
  assert dashboard_tag("loss") == "train/loss"
  assert dashboard_tag("rewards/chosen") == "train/rewards/chosen"
  assert dashboard_tag("eval/loss") == "eval/loss"
  assert dashboard_tag("task/accuracy") == "task/accuracy"


def test_tensorboard_train_tags_are_prefixed_and_jsonl_keys_are_not(tmp_path):
  config = configs.get("dpo:tiny")
  config.metrics.progress_bar = False
  writer = MetricsWriter(config, tmp_path, total_steps=2, initial_step=0)
  writer.write(1, {"loss": 0.5, "rewards/chosen": 0.1, "epoch": 0.5})
  writer.write(2, {"eval/loss": 0.4, "task/accuracy": 1.0})
  writer.close()
  assert _tensorboard_tags(tmp_path / "tensorboard") == {
      "train/loss", "train/rewards/chosen", "train/epoch", "eval/loss", "task/accuracy"}
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records[0] == {"step": 1, "loss": 0.5, "rewards/chosen": 0.1, "epoch": 0.5}
