"""PPO-RLHF on the one loop (algorithm "ppo"), on a tiny random model with the bundled tokenizer.

The loop runs use four fixed prompts (a jsonl file, so every iteration sees the same ones) whose
reward is a per-prompt constant: a critic that reads the prompt can learn it exactly. They share
one configuration (one update per iteration, adaptive KL), so their programs compile once. The
math is checked by hand in test_losses_ppo.py.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import jaxpost
from jaxpost.algos import ppo
from jaxpost.hf import build_module, load_model
from jaxpost.losses import ppo as ppo_math
from jaxpost.models.config import LlamaConfig
from jaxpost.models.llama import init_params
from jaxpost.train import algorithms
from jaxpost.train.export import load_trained
from jaxpost.train.optim import build_optimizer, member_optimizer
from jaxpost.train.validate import ConfigError
from tests.conftest import make_hf_model, run_on_fake_devices

REWARDS = '''
def prompt_reward(prompts, completions, target, **columns):
    return [float(t) for t in target]
'''
PROMPTS = [{"prompt": f"Say the number {w}.", "target": t}
           for w, t in (("one", 1.0), ("two", -1.0), ("three", 2.0), ("four", 0.0))]
TRL_KEYS = ("objective/kl", "objective/entropy", "objective/non_score_reward",
            "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg",
            "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg", "loss/value_avg",
            "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "kl_coef",
            "critic/vf_explained_var", "grad_norm/policy", "grad_norm/value")
KL_TARGET, KL_HORIZON, ROWS = 0.5, 16.0, 4


def tiny_config(tmp_path, name="run", **overrides):
  (tmp_path / "ppo_rewards.py").write_text(REWARDS)
  data = tmp_path / "prompts.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
  c = jaxpost.configs.get("ppo:tiny")
  c.update_from_flattened_dict({
      "workdir": str(tmp_path / name),
      "reward.funcs": f"{tmp_path / 'ppo_rewards.py'}:prompt_reward",
      "data.train": str(data), "data.task_kind": None, "metrics.progress_bar": False,
      "metrics.tensorboard": False, "eval_at_start": False, "report.task": "",
      "checkpoint.async_save": False, "ppo.num_epochs": 1, "ppo.kl_target": KL_TARGET,
      "ppo.kl_horizon": KL_HORIZON, "optimizer.learning_rate": 3e-4,
      "critic.optimizer.learning_rate": 3e-3, "max_steps": 6, **overrides})
  return c


def records(workdir):
  return [r for r in map(json.loads, open(f"{workdir}/metrics.jsonl")) if "loss" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """Six iterations straight, a checkpoint every 3, the policy exported at the end."""
  tmp = tmp_path_factory.mktemp("ppo")
  out = jaxpost.train(tiny_config(tmp, name="straight", export_hf="hf",
                                  **{"checkpoint.every": 3}))
  return tmp, out, records(tmp / "straight")


def test_metrics_first_update_ratio_one_and_export(straight):
  """TRL's names are logged; one update per rollout: the update's forward is π_old (ratio 1, no
  clipping of the ratio or the values); the export is the policy as an HF causal LM."""
  tmp, out, rows = straight
  assert out["step"] == 6 and len(rows) == 6
  for key in TRL_KEYS:
    assert all(np.isfinite(r[key]) for r in rows), key
  for r in rows:
    assert abs(r["val/ratio"] - 1.0) < 1e-5 and r["policy/clipfrac_avg"] == 0.0
    assert r["val/clipfrac_avg"] == 0.0 and r["policy/approxkl_avg"] < 1e-10
    assert r["grad_norm/policy"] > 0 and r["grad_norm/value"] > 0
    assert r["grad_norm"] == pytest.approx(np.hypot(r["grad_norm/policy"],
                                                    r["grad_norm/value"]), rel=1e-5)
  assert rows[0]["time/compile"] > 0  # the update compiled ahead of its call, timed apart
  # fp32, no top-k / top-p: π_old is the sampler's log-probs, not recomputed (ratio 1 above)
  assert "sampling/logp_difference/mean" not in rows[0]
  assert rows[0]["objective/scores"] == pytest.approx(0.5)  # the four targets' mean
  assert abs(rows[0]["objective/kl"]) < 1e-5                # the reference is the initial policy
  restored = load_trained(str(tmp / "straight"))  # from the {policy, value} checkpoint
  lm = load_model(str(tmp / "straight" / "hf"), scan_layers=restored.config.scan_layers)
  assert lm.head == "lm" and lm.config.hidden_size == 64
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(lm.params)):
    np.testing.assert_array_equal(a, b)


def test_adaptive_kl_moves_towards_the_target(straight):
  """β_{i+1} = β_i (1 + clip(KL_i / target − 1, ±0.2) · n / horizon): down while KL < target."""
  _, _, rows = straight
  assert rows[0]["kl_coef"] == pytest.approx(0.05)
  for a, b in zip(rows, rows[1:]):
    error = np.clip(a["objective/kl"] / KL_TARGET - 1, -0.2, 0.2)
    assert b["kl_coef"] == pytest.approx(a["kl_coef"] * (1 + error * ROWS / KL_HORIZON), rel=1e-5)
  assert rows[1]["kl_coef"] < rows[0]["kl_coef"]  # KL 0 < target at the first iteration


def test_critic_learns(straight):
  """The per-prompt targets are learnable from the prompt: explained variance rises from the
  zero head's exact 0 (V ≡ 0 explains nothing), the value loss falls."""
  _, _, rows = straight
  ev = [r["critic/vf_explained_var"] for r in rows]
  assert ev[0] == pytest.approx(0.0, abs=1e-6) and ev[-1] > 0.2, ev
  value_loss = [r["loss/value_avg"] for r in rows]
  assert np.mean(value_loss[3:]) < value_loss[0], value_loss


def test_kill_and_resume_is_bitwise(straight, tmp_path):
  """Three iterations, a restart (β and the RNG come back from the checkpoint), three more."""
  _, _, rows = straight
  jaxpost.train(tiny_config(tmp_path, name="resumed", max_steps=3, **{"checkpoint.every": 3}))
  jaxpost.train(tiny_config(tmp_path, name="resumed", **{"checkpoint.every": 3}))
  resumed = records(tmp_path / "resumed")
  assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(rows, resumed):
    for key in ("loss", "kl_coef", "objective/kl", "loss/value_avg", "grad_norm/policy",
                "critic/vf_explained_var", "completions/mean_length"):
      assert a[key] == b[key], (a["step"], key, a[key], b[key])


FAKE_DEVICES = """
import sys
sys.path.insert(0, "tests")
import jaxpost
from test_ppo import tiny_config
from pathlib import Path
c = tiny_config(Path({tmp!r}), name="mesh", max_steps=2, **{{"mesh.data": 2, "mesh.fsdp": 2,
                                                           "mesh.tensor": 2,
                                                           "checkpoint.every": 0}})
jaxpost.train(c)
print("OK")
"""


def test_eight_fake_devices_match_one(straight, tmp_path):
  """data=2 x fsdp=2 x tensor=2 samples the same completions and takes the same updates."""
  _, _, rows = straight
  run_on_fake_devices(FAKE_DEVICES.format(tmp=str(tmp_path)), devices=8)
  for a, b in zip(rows, records(tmp_path / "mesh")):
    assert a["completions/mean_length"] == b["completions/mean_length"]
    for key in ("loss", "grad_norm/policy", "grad_norm/value", "objective/kl", "kl_coef",
                "critic/vf_explained_var", "param_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=1e-6, err_msg=key)


def test_lora_policy_epochs_and_minibatches_clip(tmp_path):
  """LoRA adapters on the policy, a full critic; 2 epochs x 2 minibatches: the later updates
  see ρ != 1 and clip. Top-k sampling: π_old is recomputed by the training forward (the
  sampler's q is truncated), so the first update's ratio is 1 and logp_difference is logged."""
  c = tiny_config(tmp_path, max_steps=1, **{
      "ppo.num_epochs": 2, "ppo.num_minibatches": 2, "lora.rank": 4, "lora.alpha": 8.0,
      "optimizer.learning_rate": 3e-2, "checkpoint.every": 0, "export_hf": "hf",
      "rollout.top_k": 8})
  assert ppo.settings(c).rollout.recompute_logprobs
  jaxpost.train(c)
  rows = records(tmp_path / "run")
  assert all(r["sampling/logp_difference/max"] > 0 for r in rows)
  assert max(r["policy/clipfrac_avg"] for r in rows) > 0
  assert all(r["grad_norm/value"] > 0 for r in rows)
  assert load_model(str(tmp_path / "run" / "hf")).head == "lm"


# --- without the loop --------------------------------------------------------------------------

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16)


@pytest.mark.parametrize("ent_coef", [0.0, 0.5])
def test_ppo_gradient_is_reinforce_with_whitened_advantages(ent_coef):
  """num_epochs = num_minibatches = 1, vf_coef = 0, β = 0: the policy gradient of the PPO loss
  equals −∇ mean_m(Â log π) with Â the whitened GAE advantages (ρ = 1 at the first update),
  minus ent_coef · ∇ mean_m H with H the entropy of the model's dense logits (autodiff)."""
  cfg = LlamaConfig.from_hf({"model_type": "llama", **TINY})
  policy, critic = build_module(cfg, "lm"), build_module(cfg, "score")
  params = {"policy": init_params(policy, jax.random.PRNGKey(0)),
            "value": init_params(critic, jax.random.PRNGKey(1))}
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, 64, (4, 8)), jnp.int32)
  lengths = np.array([8, 6, 7, 5])
  attention = jnp.asarray(np.arange(8)[None] < lengths[:, None], jnp.int32)
  completion = attention * jnp.asarray(np.arange(8)[None] >= 3, jnp.int32)
  rows = {"input_ids": ids, "attention_mask": attention, "positions": jnp.broadcast_to(
      jnp.arange(8), (4, 8)) * attention, "completion_mask": completion,
          "finished": jnp.array([False, True, True, True])}
  c = jaxpost.configs.get("ppo:tiny")
  c.ppo.update({"num_epochs": 1, "vf_coef": 0.0, "kl_coef": 0.0, "ent_coef": ent_coef})
  s = ppo.settings(c)
  ctx = algorithms.LossContext(policy, c, True, {"value": critic})
  from jaxpost.losses.logprobs import model_token_stats
  logps = lambda p: model_token_stats(policy, p, {**rows, "loss_mask": completion},
                                      temperature=s.rollout.scoring_temperature)["logprobs"]
  # π_old: the sampler's in fp32 without top-k / top-p (ppo.needs_recompute), jitted: eager
  # Flax dispatch is slow
  rows["sampler_logprobs"] = jax.jit(logps)(params["policy"])
  values = jax.jit(lambda p: ppo.token_values(critic, p, rows))(params["value"])
  batch, _ = ppo.advantages(s, 0.0, jnp.asarray([1.0, -2.0, 0.5, 3.0]), rows, None, values)
  grads = jax.jit(jax.grad(lambda p: ppo.rollout_loss(s, p, {}, batch, None, ctx)[0]))(params)
  mask = completion.astype(jnp.float32)

  def dense_entropy(p):  # H_t of softmax(z_{t-1} / temperature) from the [B, T, V] logits
    logits = policy.apply({"params": p}, ids, rows["attention_mask"], rows["positions"])
    logp = jax.nn.log_softmax(logits[:, :-1] / s.rollout.scoring_temperature)
    return jnp.pad(-jnp.sum(jnp.exp(logp) * logp, -1), ((0, 0), (1, 0)))

  reinforce = jax.jit(jax.grad(lambda p: -jnp.sum(
      (batch["advantages"] * logps(p) + ent_coef * dense_entropy(p)) * mask) / jnp.sum(mask)))(
          params["policy"])
  for a, b in zip(jax.tree.leaves(grads["policy"]), jax.tree.leaves(reinforce)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["value"]))
  # Â is the whitened GAE of the score at the last token (β = 0)
  adv, _ = ppo_math.gae(ppo_math.last_token_onehot(mask) * jnp.asarray([[1.0], [-2.0], [0.5],
                                                                          [3.0]]),
                        values, mask, s.loss.gamma, s.loss.lam)
  np.testing.assert_allclose(batch["advantages"], ppo_math.masked_whiten(adv, mask) * mask,
                             rtol=1e-5, atol=1e-6)


def test_policy_and_critic_have_their_own_learning_rate():
  """SGD without momentum or clipping: each member's update is −lr_member · its gradient."""
  c = jaxpost.configs.get("ppo:tiny")
  c.optimizer.update({"name": "sgd", "learning_rate": 0.1, "max_grad_norm": 0.0,
                      "warmup_steps": 0, "weight_decay": 0.0, "momentum": 0.0})
  c.critic.optimizer.update({"learning_rate": 0.5, "max_grad_norm": 0.0})
  policy_tx, _ = build_optimizer(c.optimizer, 10)
  critic_tx, _ = build_optimizer(ppo.critic_optimizer(c), 10)
  tx = member_optimizer({"policy": policy_tx, "value": critic_tx})
  params = {"policy": {"w": jnp.ones(3)}, "value": {"w": jnp.ones(2)}}
  grads = {"policy": {"w": jnp.array([1.0, 2.0, 3.0])}, "value": {"w": jnp.array([4.0, 5.0])}}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["policy"]["w"], -0.1 * grads["policy"]["w"], rtol=1e-6)
  np.testing.assert_allclose(updates["value"]["w"], -0.5 * grads["value"]["w"], rtol=1e-6)


def test_a_fresh_value_head_starts_at_zero_a_reward_models_is_kept(tmp_path):
  """The critic from an LM checkpoint (no score.weight) gets a zero head, V ≡ 0; from a reward
  model it keeps the trained head."""
  make_hf_model("llama_tied", tmp_path / "lm")
  rm = make_hf_model("llama_tied", tmp_path / "rm", seed=1, head="score")
  policy = load_model(str(tmp_path / "lm"), tokenizer=False)
  load = lambda name_or_path=None, head="lm", seed=0: load_model(
      name_or_path or str(tmp_path / "lm"), head=head, seed=seed, tokenizer=False)

  def critic_head(**keys):
    c = jaxpost.configs.get("ppo:tiny")
    c.update_from_flattened_dict(keys)
    member = ppo.critic_member(algorithms.SetupContext(c, policy, load))[ppo.VALUE]
    return np.asarray(member.params["score"]["kernel"])

  for keys in ({}, {"critic.name_or_path": str(tmp_path / "lm")}):
    assert not np.any(critic_head(**keys)), keys
  trained = rm.score.weight.detach().numpy().T
  np.testing.assert_array_equal(critic_head(**{"reward.model": str(tmp_path / "rm")}), trained)
  shared = critic_head(**{"reward.model": str(tmp_path / "rm"), "critic.share_backbone": True})
  np.testing.assert_array_equal(shared, trained)


@pytest.mark.parametrize("bad, message", [
    ({"ppo.num_minibatches": 3}, r"config.batch_size=4 prompts x config.ppo.num_generations=1"),
    ({"ppo.kl_estimator": "k2"}, r"config.ppo.kl_estimator='k2'"),
    ({"critic.optimizer.learning_rate": -1.0}, r"config.critic.optimizer"),
    ({"reward.funcs": ""}, r"needs a reward"),
])
def test_bad_keys_fail_before_any_model_loads(tmp_path, bad, message):
  with pytest.raises((ValueError, ConfigError), match=message):
    jaxpost.train(tiny_config(tmp_path, **bad))


def test_unknown_ppo_and_critic_keys_are_named():
  c = jaxpost.configs.get("ppo:tiny")
  with c.unlocked():
    c.ppo.clip_range = 0.3
  with pytest.raises(ValueError, match=r"config.ppo.clip_range is not a ppo key"):
    ppo.check_keys(c)
  c = jaxpost.configs.get("ppo:tiny")
  c.critic.optimizer = ml_collections.ConfigDict({"lr": 1e-3})
  with pytest.raises(ValueError, match=r"config.critic.optimizer.lr is not an optimizer key"):
    ppo.check_keys(c)
