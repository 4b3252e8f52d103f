"""Terminal chat with a model's chat template; replies stream token by token.

    python scripts/chat.py [--model=bundled:smollm2-135m-instruct] [--system "You are terse."]
        [--temperature=0.7 --top_p=0.9 --max_new_tokens=256]

Commands: /reset clears the history, /quit (or Ctrl-D, or Ctrl-C at the prompt) exits. Ctrl-C
while a reply streams stops that reply and returns to the prompt; the part shown stays in the
history. Line editing and input history use `readline` where Python has it. The whole history
is re-rendered with the chat template and prefilled every turn.
"""

import argparse
import contextlib
import signal
import sys

import jaxpost
from jaxpost.generate import stream

STOPPED = " [stopped]"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="bundled:smollm2-135m-instruct")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--system", default=None, help="system prompt")
  p.add_argument("--max_new_tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--min_p", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def reply(lm, history, args, turn, out=sys.stdout) -> str:
  """Streams the assistant's reply to `out` as tokens arrive; returns the text shown. Ctrl-C
  (KeyboardInterrupt) ends the reply early with the text shown so far."""
  tok = lm.tokenizer
  ids, shown = [], ""
  tokens = stream(lm, history, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  min_p=args.min_p, seed=args.seed + turn)
  try:
    with contextlib.closing(tokens):
      for token in tokens:
        ids.append(token)
        text = tok.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
          out.write(text[len(shown):])
          out.flush()
          shown = text
  except KeyboardInterrupt:
    out.write(STOPPED)
  out.write("\n")
  out.flush()
  return shown


def chat(lm, args, read=input, out=sys.stdout, err=sys.stderr):
  """The chat loop: `read(prompt)` gives a user line (EOFError / KeyboardInterrupt end the
  session), replies stream to `out`."""
  system = [{"role": "system", "content": args.system}] if args.system else []
  history = list(system)
  print("Chat ready. /reset clears the history, /quit exits; Ctrl-C stops a reply.", file=err)
  turn = 0
  while True:
    try:
      user = read("you> ").strip()
    except (EOFError, KeyboardInterrupt):
      print(file=err)
      return
    if user == "/quit":
      return
    if user == "/reset":
      history = list(system)
      continue
    if not user:
      continue
    history.append({"role": "user", "content": user})
    out.write("assistant> ")
    try:
      text = reply(lm, history, args, turn, out)
    except ValueError as e:  # e.g. the history outgrew the model's context
      print(f"\n[error] {e}  (use /reset)", file=err)
      history.pop()
      continue
    history.append({"role": "assistant", "content": text.strip()})
    turn += 1


def main(argv=None):
  args = parse_args(argv)
  # Ctrl-C is part of this UI: take it back when started with SIGINT ignored or blocked (both
  # are inherited: a shell script's background jobs start with it ignored).
  signal.signal(signal.SIGINT, signal.default_int_handler)
  if hasattr(signal, "pthread_sigmask"):  # POSIX only
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
  if sys.stdin.isatty():
    with contextlib.suppress(ImportError):
      import readline  # noqa: F401  (input() gains line editing and history)
  try:
    lm = jaxpost.load_model(args.model, dtype=args.dtype)
  except KeyboardInterrupt:
    raise SystemExit(130)
  if lm.tokenizer is None or not getattr(lm.tokenizer, "chat_template", None):
    raise SystemExit(f"{args.model}: chat needs a tokenizer with a chat template")
  chat(lm, args)


if __name__ == "__main__":
  main()
