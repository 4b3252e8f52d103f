"""Makes a module callable, so `jaxpost.train(config)` and `jaxpost.generate(lm, prompts)` call
their main function while `jaxpost.train.loop` / `jaxpost.generate.sample_tokens` stay importable
(a plain `from ... import train` in jaxpost/__init__.py would shadow the module)."""

import sys
import types


def make_callable(module_name: str, function_name: str):
  module = sys.modules[module_name]

  class CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
      return getattr(self, function_name)(*args, **kwargs)

  CallableModule.__doc__ = module.__doc__
  module.__class__ = CallableModule
