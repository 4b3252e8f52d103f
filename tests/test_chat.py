"""scripts/chat.py on a tiny random model: Ctrl-C (SIGINT) while a reply streams stops the reply
and returns to the prompt; Ctrl-C or Ctrl-D (end of input) at the prompt exits cleanly."""

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxpost.hf import LoadedModel, save_model
from jaxpost.models.config import LlamaConfig
from jaxpost.models.llama import LlamaForCausalLM, init_params
from tests.conftest import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import chat  # noqa: E402


TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
            "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


@pytest.fixture(scope="module")
def tiny_chat_model():
  """A random 2-layer model on a 2,000-word tokenizer whose sampled replies never stop early:
  the special tokens' (tied) embedding rows are 0, so their logit is 0, while the word rows are
  scaled up until the best words' logits lie ~20 above it."""
  tok = word_tokenizer([f"w{i}" for i in range(2000)], ["<s>", "</s>", "<|im_start|>",
                                                        "<|im_end|>"], template=TEMPLATE)
  cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=8, max_position_embeddings=65536, tie_word_embeddings=True,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
  model = LlamaForCausalLM(cfg)
  params = jax.jit(lambda key: init_params(model, key))(jax.random.PRNGKey(0))
  special = [tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens]
  embed = params["model"]["embed_tokens"]["embedding"]
  params["model"]["embed_tokens"]["embedding"] = (50 * embed).at[jnp.asarray(special)].set(0.0)
  return LoadedModel(model, params, tok, cfg)


class Output:
  """Collects a pipe's text on a thread; `wait_for` blocks until a string shows up."""

  def __init__(self, pipe):
    self.text, self._pipe = "", pipe
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for chunk in iter(lambda: os.read(self._pipe.fileno(), 4096), b""):
      self.text += chunk.decode(errors="replace")

  def wait_for(self, needle, start=0, timeout=120.0):
    deadline = time.time() + timeout
    while needle not in self.text[start:]:
      assert time.time() < deadline, f"no {needle!r} in {self.text[-2000:]!r}"
      time.sleep(0.01)
    return self.text.index(needle, start) + len(needle)


REPLY_TOKENS = 50_000


def test_ctrl_c_stops_the_reply_then_exits_at_the_prompt(tiny_chat_model, tmp_path):
  save_model(tiny_chat_model, tmp_path / "lm")
  proc = subprocess.Popen(
      [sys.executable, "-u", "scripts/chat.py", f"--model={tmp_path / 'lm'}",
       # A reply far longer than the SIGINT takes to land (it would stream for minutes).
       f"--max_new_tokens={REPLY_TOKENS}", "--temperature=1.0"],
      cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  out, err = Output(proc.stdout), Output(proc.stderr)
  try:
    proc.stdin.write(b"Tell me a long story.\n")
    proc.stdin.flush()
    start = out.wait_for("assistant> ")
    out.wait_for(" w", start)  # the reply is streaming
    proc.send_signal(signal.SIGINT)
    end = out.wait_for(chat.STOPPED + "\nyou> ", start)
    assert proc.poll() is None  # back at the prompt, not exited
    assert len(out.text[start:end].split()) < REPLY_TOKENS  # stopped before the reply's end
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
  finally:
    proc.kill()
  assert "Traceback" not in err.text, err.text


def test_end_of_input_ctrl_c_or_quit_at_the_prompt_end_the_session(tiny_chat_model):
  args = chat.parse_args([])
  for lines in (["/reset", "", EOFError], ["", KeyboardInterrupt], ["/quit", "never read"]):
    queue = iter(lines)
    def read(prompt, queue=queue):
      line = next(queue)
      if not isinstance(line, str):
        raise line
      return line
    chat.chat(tiny_chat_model, args, read=read, out=io.StringIO(), err=io.StringIO())
    assert next(queue, None) in (None, "never read")
