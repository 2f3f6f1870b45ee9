"""Deployment paths: torch.compile (one graph, fixed k) and ONNX export run by onnxruntime."""
import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model


@pytest.fixture
def model():
    return tiny_model(num_classes=5, k=10)


def train_step_grads(forward, model, x, labels):
    """Logits and parameter gradients of one classification step; `forward` is `model` or its compiled form."""
    model.zero_grad()
    logits = forward(x)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_training_step_is_one_graph_and_matches_eager(model, images):
    """fullgraph=True: dynamo must capture selector, top-k, patch gather and blocks with no graph break;
    aot_eager traces forward and backward through AOTAutograd, as inductor would, without its C++ build."""
    torch._dynamo.reset()
    x, labels = images(2), torch.tensor([1, 3])
    model.set_selector_trainable(True)  # gradients through the selector's prefix tokens too
    model.train()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    logits, grads = train_step_grads(compiled, model, x, labels)
    eager_logits, eager_grads = train_step_grads(model, model, x, labels)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and 'selector.backbone.blocks.0.attn.qkv.weight' in grads
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager(model, images):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # inductor: generated C++ kernels on CPU
    with torch.no_grad():
        for seed in (0, 1):  # a second input reuses the compiled graph, with its own selection
            x = images(2, seed=seed)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_and_matches_torch(model, images, tmp_path):
    batch = torch.export.Dim('batch', min=1, max=64)
    program = torch.onnx.export(model, (images(2),), dynamo=True, input_names=['images'], output_names=['logits'],
                                dynamic_shapes={'x': {0: batch}}, verbose=False)
    program.save(str(tmp_path / 'lookwhere.onnx'))
    # the selection is computed in the graph, not frozen from the example input
    assert 'TopK' in {node.op_type for node in program.model_proto.graph.node}
    session = onnxruntime.InferenceSession(str(tmp_path / 'lookwhere.onnx'), providers=['CPUExecutionProvider'])
    for batch_size, seed in ((2, 1), (3, 2)):
        x = images(batch_size, seed=seed)
        logits, = session.run(None, {'images': x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


class DenseOutput(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_dense(x)


@pytest.mark.slow
def test_onnx_export_of_dense_output_matches_torch_on_every_cell(model, images, tmp_path):
    program = torch.onnx.export(DenseOutput(model), (images(2),), dynamo=True, input_names=['images'],
                                output_names=['dense'], verbose=False)
    program.save(str(tmp_path / 'dense.onnx'))
    session = onnxruntime.InferenceSession(str(tmp_path / 'dense.onnx'), providers=['CPUExecutionProvider'])
    x = images(2, seed=3)
    dense, = session.run(None, {'images': x.numpy()})
    with torch.no_grad():
        expected = model.forward_dense(x).numpy()
    assert np.isfinite(dense).all()  # the chosen cells too, where the distance is 0
    np.testing.assert_allclose(dense, expected, rtol=0, atol=1e-4)
