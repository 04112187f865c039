"""`trainer=ddp` on CPU: 2 gloo ranks started from a Hydra multirun, replayed in one process.

The job runs through the real entry point with `-m` (the case where Lightning's own re-launch
breaks: children would re-run the sweep and write other folders). A probe callback
(tests/integration/ddp_probe.py) saves what each rank saw: its batch, its RNG state before the
forward, its loss, the gradients after DDP's all-reduce, the final weights. This process then
rebuilds the same model from the same initial weights and replays both ranks' forwards:

- each rank's loss is bit-identical to the replayed one, and their mean equals the loss of one
  process over the global batch (the two halves concatenated, same t and noise) to 1e-6;
- DDP's gradients are bit-identical on both ranks and to the replayed (g0 + g1) / 2, and equal
  the global-batch gradients to float32 rounding;
- after 2 AdamW steps (+ EMA) the weights and EMA shadows of both ranks, of the checkpoint and of
  the replay are bit-identical: with broadcast_buffers=False the EMA still agrees everywhere.

The ranks draw different t/noise (segldm.runtime.distributed re-seeds rank r with seed + r), so
equivalence with one process holds for the same draws, which the replay reuses.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_TRAINER, TINY_UNET, compose_train, run_train

BASE_LR = 1e-4
BATCH = 4  # per device (TINY_DATA)
MODEL_ARGS = [
    *TINY_DATA,
    *TINY_FIRST_STAGE,
    *TINY_UNET,
    "model.first_stage.ckpt_path=null",  # an untrained (but frozen, deterministic) first stage is enough here
    "model.require_pretrained_first_stage=false",
    f"model.optimization.base_learning_rate={BASE_LR}",
    "model.optimization.scale_lr=true",
    "model.ema_decay=0.9",
    "scheduler.warm_up_steps=1",
]
DDP_ARGS = [
    *MODEL_ARGS,
    *[a for a in TINY_TRAINER if a != "trainer=cpu"],
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.max_steps=2",
]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    probe = root / "probe"
    proc = run_train(
        [
            "-m",
            *DDP_ARGS,
            "+callbacks.probe._target_=tests.integration.ddp_probe.DDPProbe",
            f"+callbacks.probe.out_dir={probe}",
            "hydra.sweep.dir=${paths.output_root}/multiruns/ddp",
            "run_name=ddp",
        ],
        root,
        timeout=300,
    )
    ranks = [torch.load(probe / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in (0, 1)]
    return root, proc, ranks


def test_children_rerun_the_job_not_the_sweep(ddp_run):
    root, proc, ranks = ddp_run
    outputs = root / "outputs"
    sweep = outputs / "multiruns/ddp"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "report"]
    job = sweep / "0"
    assert (job / "train_rank1.log").is_file()  # rank 1 ran inside the job's folder ...
    assert (job / ".hydra/config.yaml").is_file()  # ... and left .hydra/ to rank 0
    assert not (outputs / "runs").exists()  # no run folder of its own
    assert [p.name for p in (outputs / "multiruns").iterdir()] == ["ddp"]  # no sweep of its own
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["last.ckpt", "step0000002.ckpt"]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert proc.stdout.count("effective learning rate") == 1  # printed by rank 0
    assert "base x batch 4 x accumulation 1 x devices 2 x nodes 1" in proc.stdout


def test_one_mlflow_run_with_the_scaled_learning_rate(ddp_run):
    root, _, ranks = ddp_run
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("segldm")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'ddp-0'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    lr = BASE_LR * BATCH * 1 * 2 * 1  # base x batch x accumulation x devices x nodes
    assert float(runs[0].data.params["effective_learning_rate"]) == pytest.approx(lr)
    assert ranks[0]["initial_lr"] == pytest.approx([lr]) == ranks[1]["initial_lr"]
    assert runs[0].data.tags["segldm.sweep_id"] == "multiruns/ddp"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) == 2


def test_ranks_read_disjoint_shards_with_their_own_draws(ddp_run):
    _, _, ranks = ddp_run
    for step in range(2):
        ids = [set(r["steps"][step]["batch"]["index"].tolist()) for r in ranks]
        assert len(ids[0]) == len(ids[1]) == BATCH and not ids[0] & ids[1]
        assert not torch.equal(ranks[0]["steps"][step]["rng"], ranks[1]["steps"][step]["rng"])
    for key, value in ranks[0]["init"].items():
        assert torch.equal(value, ranks[1]["init"][key]), key


def _replay_draws(model, batch, rng):
    """z, c, t, noise of one rank's forward, drawn in the model's order from its RNG state."""
    torch.set_rng_state(rng)
    z, c = model.get_batch_latents(batch)
    t = torch.randint(0, model.num_timesteps, (z.shape[0],)).long()
    noise = torch.randn_like(z)
    return z, c, t, noise


def test_loss_gradients_and_weights_match_one_process(ddp_run):
    root, _, ranks = ddp_run
    cfg = compose_train([*MODEL_ARGS, "paths.output_dir=" + str(root / "replay")])
    model = instantiate(cfg.model, scheduler=instantiate(cfg.scheduler))
    model.load_state_dict(ranks[0]["init"], strict=True)
    model.train()
    params = list(model.model.parameters()) + list(model.cond_stage_model.parameters())
    names = [f"model.{n}" for n, _ in model.model.named_parameters()]
    names += [f"cond_stage_model.{n}" for n, _ in model.cond_stage_model.named_parameters()]
    optimizer = model.make_optimizer(params, ranks[0]["initial_lr"][0])  # as configure_optimizers
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, model.lr_lambda)

    deviations = {"loss": 0.0, "grad": 0.0}  # one process over the global batch vs the ranks' mean
    for step in range(2):
        optimizer.zero_grad()
        rank_losses, rank_grads = [], []
        for rank in ranks:
            record = rank["steps"][step]
            torch.set_rng_state(record["rng"])
            loss, _ = model.shared_step(record["batch"])  # what the rank computed, from its RNG state
            assert torch.equal(loss.detach(), record["loss"]), (step, rank["rank"])
            rank_losses.append(loss)
            rank_grads.append(torch.autograd.grad(loss, params))
        averaged = [
            g0 / 2 + g1 / 2 for g0, g1 in zip(*rank_grads, strict=True)
        ]  # DDP: g/world, all-reduce sum
        for name, grad in zip(names, averaged, strict=True):
            assert torch.equal(ranks[0]["steps"][step]["grads"][name], grad), (step, name)
            assert torch.equal(ranks[1]["steps"][step]["grads"][name], grad), (step, name)

        # one process, the global batch (both halves with the same t and noise)
        draws = [_replay_draws(model, r["steps"][step]["batch"], r["steps"][step]["rng"]) for r in ranks]
        z, c, t, noise = (torch.cat(parts) for parts in zip(*draws, strict=True))
        global_loss, _ = model.p_losses(z, model.get_learned_conditioning(c), t, noise)
        mean_loss = (rank_losses[0] + rank_losses[1]) / 2
        torch.testing.assert_close(global_loss, mean_loss, rtol=1e-6, atol=0)
        global_grads = torch.autograd.grad(global_loss, params)
        for grad, reference in zip(averaged, global_grads, strict=True):
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-7)
            scale = reference.abs().max().clamp_min(1e-12)
            deviations["grad"] = max(deviations["grad"], ((grad - reference).abs().max() / scale).item())
        deviations["loss"] = max(deviations["loss"], abs((global_loss - mean_loss) / mean_loss).item())

        for param, grad in zip(params, averaged, strict=True):
            param.grad = grad
        optimizer.step()
        model.model_ema(model.model)
        scheduler.step()

    checkpoint = torch.load(
        root / "outputs/multiruns/ddp/0/checkpoints/last.ckpt", map_location="cpu", weights_only=False
    )
    assert checkpoint["global_step"] == 2
    replayed = model.state_dict()
    for key, value in replayed.items():
        assert torch.equal(ranks[0]["final"][key], value), key
        assert torch.equal(ranks[1]["final"][key], value), key  # EMA agrees without buffer broadcast
        assert torch.equal(checkpoint["state_dict"][key], value), key
    assert int(replayed["model_ema.num_updates"]) == 2
    ema_moved = any(
        not torch.equal(replayed[k], ranks[0]["init"][k]) for k in replayed if k.startswith("model_ema.")
    )
    assert ema_moved
    print(
        f"global batch vs DDP: max relative loss deviation {deviations['loss']:.2e}, gradients {deviations['grad']:.2e}"
    )
