

def test_wide_wgmma_in_half_precision_logit_sweeps(report):
    """fp16/bf16 forward and backward sweeps issue wgmma with N >= 64 (m64n32 caps the tensor
    cores at about half their peak with both operands from shared memory)."""
    narrow = []
    for kernel in report["kernels"]:
        if kernel["config"]["dtype"] not in ("bf16", "fp16") or \
                kernel["name"] not in ("_kd_loss_fwd_kernel", "_kd_loss_bwd_kernel"):
            continue
        assert kernel["wgmma_shapes"], kernel["name"]
        for shape in kernel["wgmma_shapes"]:
            n = int(shape.split("n")[1].split("k")[0])
            if n < 64:
                narrow.append((kernel["name"], kernel["config"]["case"], shape))
    assert not narrow
