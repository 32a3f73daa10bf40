"""What the suite needs from the machine. Outside CI a missing piece skips the tests that need it (with
the reason); under ``CI=true`` each missing piece fails here by name, so CI cannot pass by skipping."""
from memoe_fast.testing import require, require_module, shared_data_dir, shared_data_path


def test_shared_data_folder():
    folder = shared_data_dir()
    for name in ("zsre_mend_train-1k.json", "counterfact-edit-1k.json", "counterfact_500.json"):
        require(shared_data_path(name) is not None, f"{name} in the shared data folder {folder} (../shared/data)")


def test_triton():
    require_module("triton", "the fused kernels")


def test_bitsandbytes():
    require_module("bitsandbytes", "the 8-bit backbone")


def test_onednn_linear_ops():
    from memoe_fast.editing.prepack import prepack_available

    require(prepack_available(), "oneDNN linear ops in this torch build (torch.ops.mkldnn._reorder_linear_weight, "
                                 "_linear_pointwise)")
