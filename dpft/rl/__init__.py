"""RL fine-tuning layer of dpft.

Pure math (torch only, no numpy, no env or model imports), each module importable on its own:

- :mod:`dpft.rl.returns`: chunk-level GAE (bootstraps at truncation, stops at termination),
  :class:`~dpft.rl.returns.RunningRewardScaler`, :class:`~dpft.rl.returns.RunningMeanStd`.
- :mod:`dpft.rl.ppo_loss`: DPPO clip schedule and denoising discount, clipped PPO policy loss, value loss,
  explained variance, advantage normalization.
- :mod:`dpft.rl.critic`: ``ValueNet`` (V(s)), ``TwinQ`` (Q(s, chunk)), ``polyak_update``.
- :mod:`dpft.rl.replay`: chunk-level replay buffer with an exact ``state_dict`` (IDQL).
- :mod:`dpft.rl.idql_math`: expectile loss, twin-Q target, candidate selection (IDQL).

Tensors are time-major where time matters: ``(T, N)`` = (chunks per env in the iteration, envs).
One RL step is one executed action chunk (``act_steps`` env steps, rewards summed), as in DPPO.

The package ``__init__`` imports nothing so that a module with optional dependencies cannot break the
others; import from the submodules.
"""
