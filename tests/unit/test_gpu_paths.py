"""The GPU code paths that run without a GPU (issue: train and serve on GPUs): the config keys and their errors,
the driver's refusal of `train.use_gpu` on a cluster without GPUs (naming the key, before any worker starts),
the device a worker picks, the mixed-precision policy per device and strategy, and the CLI/job flag."""

from __future__ import annotations

import pytest
import torch

from raysys.config import TrainConfig
from raysys.parallel.precision import autocast, fsdp_mp_policy, resolve_precision
from raysys.train.loop import worker_device
from raysys.train.trainer import GPU_BACKEND, check_gpu_request
from raysys.workflow.overrides import train_overrides


def test_use_gpu_on_a_cluster_without_gpus_is_refused_naming_the_key():
    tc = TrainConfig(use_gpu=True, num_workers=2)
    with pytest.raises(ValueError, match=r"train\.use_gpu: one GPU per worker for 2 workers, but this Ray cluster "
                                         r"has 0 GPU\(s\); set train\.use_gpu: false"):
        check_gpu_request(tc, {"CPU": 4.0, "memory": 1e9})
    with pytest.raises(ValueError, match=r"train\.num_workers <= 1"):
        check_gpu_request(tc, {"CPU": 4.0, "GPU": 1.0})
    check_gpu_request(tc, {"CPU": 4.0, "GPU": 2.0})  # enough
    check_gpu_request(TrainConfig(num_workers=8), {"CPU": 2.0})  # CPU training asks nothing of the cluster
    typed = TrainConfig(use_gpu=True, num_workers=1, accelerator_type="H100")
    with pytest.raises(ValueError, match=r"train\.accelerator_type: no 'H100' GPUs .*\['A100'\]"):
        check_gpu_request(typed, {"GPU": 1.0, "accelerator_type:A100": 1.0})
    check_gpu_request(typed, {"GPU": 1.0, "accelerator_type:H100": 1.0})


def test_gpu_config_keys_validate_and_name_the_field():
    with pytest.raises(ValueError, match=r"train\.accelerator_type: 'A100' asks for a GPU type, but train\.use_gpu"):
        TrainConfig(accelerator_type="A100")
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp16")
    assert TrainConfig().use_gpu is False and TrainConfig().mixed_precision == "auto"
    # the flag of `raysys train --gpu` and the train_teacher job
    assert train_overrides(gpu=True) == {"train": {"use_gpu": True}}
    assert train_overrides() is None
    assert GPU_BACKEND == "cpu:gloo,cuda:nccl"  # CPU-side collectives keep gloo beside NCCL


def test_a_cpu_worker_trains_on_the_cpu():
    assert worker_device(TrainConfig()) == torch.device("cpu")


def test_precision_is_bf16_on_gpu_fp32_on_cpu_unless_set_and_fp32_under_dp_sgd():
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"  # the CPU equivalence tests keep their fp32 tolerance
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
    assert resolve_precision("auto", "cuda", dp_sgd=True) == "fp32"  # Opacus's per-row gradients in fp32
    with pytest.raises(ValueError, match="train.mixed_precision"):
        resolve_precision("fp16", "cuda")


def test_the_fsdp_policy_computes_in_bf16_and_reduces_in_fp32():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = fsdp_mp_policy("bf16")
    assert isinstance(policy, MixedPrecisionPolicy)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert fsdp_mp_policy("fp32") is None  # FSDP2's default: fp32 throughout


def test_autocast_on_cpu_computes_in_bf16_and_fp32_leaves_it_alone():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with autocast("cpu", "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32


def test_serve_replicas_on_gpus_reserve_them_and_are_refused_without_them():
    from raysys.config import ServeConfig
    from serve.contract import check_replica_gpus, deployment_options
    from serve.endpoint import replica_device

    opts = deployment_options(ServeConfig(num_gpus=0.5))["ray_actor_options"]
    assert opts["num_gpus"] == 0.5 and opts["runtime_env"] == {"env_vars": {"MALLOC_ARENA_MAX": "2"}}
    assert "num_gpus" not in deployment_options(ServeConfig())["ray_actor_options"]  # CPU stays the default
    with pytest.raises(ValueError, match=r"serve\.num_gpus: 2 replica\(s\) x 0.5 GPU need 1 GPUs, but this Ray "
                                         r"cluster has 0; set serve\.num_gpus: 0"):
        check_replica_gpus(ServeConfig(num_gpus=0.5), {"CPU": 2.0})
    check_replica_gpus(ServeConfig(num_gpus=0.5), {"GPU": 1.0})
    check_replica_gpus(ServeConfig(), {"CPU": 2.0})
    assert replica_device(0) == torch.device("cpu")
    if not torch.cuda.is_available():  # a replica asked for a GPU that it cannot see says which key
        with pytest.raises(RuntimeError, match=r"serve\.num_gpus=1, but this replica sees no CUDA device"):
            replica_device(1)


def test_a_scorer_on_a_device_scores_there_and_answers_numpy():
    """The Scorer moves its model to the device it is given and hands back CPU numpy probabilities (here the
    CPU; a GPU replica runs the same code with device cuda)."""
    import numpy as np

    from serve.scoring import Scorer

    class Numeric(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x_num, x_cat):
            return self.lin(x_num)

    scorer = Scorer(name="m", version=1, model=Numeric(), schema=None, preprocessor=None, device=torch.device("cpu"))
    probs = scorer.predict_proba(np.zeros((4, 3), dtype=np.float32), np.zeros((4, 0), dtype=np.int64))
    assert probs.shape == (4, 2) and probs.dtype == np.float64 and np.allclose(probs.sum(1), 1.0)


def test_distill_trials_take_a_gpu_share_when_set_and_are_refused_without_gpus():
    from raysys.config import DistillConfig
    from raysys.distill.sweep.run import check_trial_gpus, trial_resources

    assert trial_resources(DistillConfig()) == {"cpu": 1}  # CPU trials stay the default
    assert trial_resources(DistillConfig(gpus_per_trial=0.25)) == {"cpu": 1, "gpu": 0.25}
    with pytest.raises(ValueError, match=r"distill\.gpus_per_trial: 0.25 of a GPU per trial, but this Ray cluster "
                                         r"has 0 GPUs; set distill\.gpus_per_trial: 0"):
        check_trial_gpus(DistillConfig(gpus_per_trial=0.25), {"CPU": 4.0})
    check_trial_gpus(DistillConfig(gpus_per_trial=0.25), {"GPU": 1.0})
    with pytest.raises(ValueError, match="gpus_per_trial"):
        DistillConfig(gpus_per_trial=2)


def test_a_student_asked_to_train_on_cuda_without_one_says_which_key():
    """fit_student's device setting: cpu trains as before; cuda without a CUDA device names the config key."""
    from raysys.distill.student import _settings

    class Data:
        num_classes, num_transfer = 4, 0

    config = {"student_spec": {"num_classes": 4}, "temperature": 2.0, "alpha": 0.5, "num_epochs": 1,
              "batch_size": 8, "lr": 1e-3}
    assert _settings(config, Data()).device == "cpu"
    with pytest.raises(ValueError, match="device"):
        _settings({**config, "device": "tpu"}, Data())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"distill\.gpus_per_trial > 0, but this trial sees no CUDA device"):
            _settings({**config, "device": "cuda"}, Data())


def test_soft_target_actors_take_the_same_gpu_share_and_score_on_their_device():
    """The Ray Data actors that score the soft targets reserve distill.gpus_per_trial of a GPU when set, and the
    predictor runs the teacher on the device it is given (the CPU here), handing back numpy logits."""
    import numpy as np

    from raysys.config import DataConfig, ModelConfig
    from raysys.data import Preprocessor, SyntheticTask
    from raysys.distill.teacher_scoring import LOGIT_PREFIX, TeacherPredictor, actor_resources
    from raysys.models import build_model, model_spec

    assert actor_resources(0.0) == {"num_cpus": 1}
    assert actor_resources(0.5) == {"num_cpus": 1, "num_gpus": 0.5}
    task = SyntheticTask(DataConfig(num_numeric=3, num_categorical=1))
    schema = task.schema()
    table = task.sample(16, [0, 1])
    pre = Preprocessor.fit(schema, table)
    teacher = build_model(model_spec(schema, ModelConfig(hidden_dims=[8])))
    pred = TeacherPredictor(teacher, schema.to_json(), pre.to_dict(), hints=False, device="cpu")
    out = pred({k: np.asarray(v) for k, v in table.to_pydict().items()})
    logits = np.stack([out[f"{LOGIT_PREFIX}{j}"] for j in range(len(schema.classes))], 1)
    assert logits.shape == (16, len(schema.classes)) and np.isfinite(logits).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_bf16_step_and_a_replica_scorer_run_on_the_device():
    """On a machine with CUDA: the loop's step under the rank's bf16 autocast trains on the GPU with fp32 weights,
    and a Scorer on cuda gives the CPU's probabilities (fp32 both; TF32 matmuls allowed for)."""
    import numpy as np

    from raysys.models import build_model
    from raysys.train.steps import to_device, train_step
    from serve.scoring import Scorer

    spec = {"family": "mlp", "num_numeric": 6, "cardinalities": [4, 3], "num_classes": 4, "hidden_dims": [32, 16],
            "embed_dim": 4, "dropout": 0.0}
    dev = torch.device("cuda", 0)
    model = build_model(spec).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batch = to_device((torch.randn(64, 6, generator=g), torch.randint(0, 3, (64, 2), generator=g),
                       torch.randint(0, 4, (64,), generator=g)), dev)
    losses = [train_step(model, opt, *batch, amp=lambda: autocast("cuda", "bf16")) for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in model.parameters())
    cpu_model = build_model(spec)
    cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    x_num, x_cat = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32), np.zeros((8, 2), dtype=np.int64)
    on_gpu = Scorer(name="m", version=1, model=model.eval(), schema=None, preprocessor=None, device=dev)
    on_cpu = Scorer(name="m", version=1, model=cpu_model.eval(), schema=None, preprocessor=None)
    np.testing.assert_allclose(on_gpu.predict_proba(x_num, x_cat), on_cpu.predict_proba(x_num, x_cat), atol=2e-3)


def test_review_fixes_pipeline_boundaries_stay_fp32_int8_versions_stay_on_cpu_soft_target_gpus_checked(monkeypatch):
    """(1) A pipeline stage under bf16 autocast hands the next stage fp32 (its receive buffers are sized from fp32
    metadata; NCCL would not notice a bf16 send); (2) an int8 version asked onto a GPU scores on the CPU (dynamic
    int8 kernels are CPU-only); (3) the soft-target actors' GPU shares are checked against the cluster too."""
    from raysys.config import DistillConfig
    from raysys.distill.sweep.run import check_trial_gpus
    from raysys.models import build_model
    from raysys.parallel.pipeline import _split_all
    from serve.scoring import Scorer

    spec = {"family": "mlp", "num_numeric": 6, "cardinalities": [4, 3], "num_classes": 4, "hidden_dims": [32, 16, 16],
            "embed_dim": 4, "dropout": 0.0}
    first, last = _split_all(build_model(spec), 2)
    x_num, x_cat = torch.randn(5, 6), torch.zeros(5, 2, dtype=torch.int64)
    with autocast("cpu", "bf16"):
        h = first(x_num, x_cat)
        assert h.dtype == torch.float32
        assert last(h).dtype == torch.bfloat16  # the last stage's logits: the loss casts them (.float())

    class Int8Version:
        name, version, schema, preprocessor, quantization = "m", 2, None, None, "dynamic_int8"
        model_spec, metrics, lineage, reference_profile = {}, {}, {}, None
        model = torch.nn.Linear(3, 2)

    monkeypatch.setattr(Scorer, "warm_up", lambda self: None)  # a Linear takes no (x_num, x_cat): its device only
    assert Scorer.from_loaded(Int8Version(), torch.device("cuda")).device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"2 soft-target actors .* x 0.5 GPU need 1 GPUs, but this Ray cluster has "
                                         r"0.5; lower distill\.soft_target_actors"):
        check_trial_gpus(DistillConfig(gpus_per_trial=0.5, soft_target_actors=2), {"GPU": 0.5})
    check_trial_gpus(DistillConfig(gpus_per_trial=0.5, soft_target_actors=2), {"GPU": 1.0})
