import numpy as np
import torch

from common.config import ModelConfig, TrainConfig
from common.models import SmallCNN, build_model, is_batchnorm_key, load_local_weights, pick_device
from common.training import masked_bce, predict, train_epochs


def test_masked_labels_give_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    target = torch.tensor([[1, float("nan"), 0]] * 6, dtype=torch.float32)
    masked_bce(logits, target).backward()
    assert torch.all(logits.grad[:, 1] == 0)
    assert torch.all(logits.grad[:, [0, 2]] != 0)


def test_masked_gradient_through_a_model():
    torch.manual_seed(0)
    net = SmallCNN(n_out=2, width=4)
    x = torch.randn(4, 1, 32, 32)
    y = torch.tensor([[float("nan"), 1.0]] * 4)
    masked_bce(net(x), y).backward()
    head = net.head[-1]
    assert torch.all(head.weight.grad[0] == 0) and torch.all(head.bias.grad[0] == 0)
    assert torch.any(head.weight.grad[1] != 0)


def test_all_masked_batch_is_zero_loss():
    loss = masked_bce(torch.zeros(3, 2, requires_grad=True), torch.full((3, 2), float("nan")))
    assert float(loss.detach()) == 0.0


def test_training_is_seeded_and_learns():
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (64, 32, 32), dtype=torch.uint8, generator=g)
    y = (imgs.float().mean((1, 2)) > 127.5).float()[:, None]
    imgs[y[:, 0] == 1, :8, :8] = 255  # an easy signal
    cfg = TrainConfig(batch_size=16, lr=3e-3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = SmallCNN(1, width=4)
        stats = train_epochs(net, imgs, y, cfg, epochs=2, seed=7, device=torch.device("cpu"))
        runs.append([p.detach().clone() for p in net.parameters()])
    assert stats.images == 128 and stats.steps == 8
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert predict(net, imgs, torch.device("cpu")).shape == (64, 1)


def test_model_zoo_and_local_weights(tmp_path):
    for arch, ch in [("resnet18", 1), ("densenet121", 3)]:
        net = build_model(ModelConfig(arch=arch, in_channels=ch), n_out=5)
        out = net(torch.zeros(2, ch, 64, 64))
        assert out.shape == (2, 5)
    src = build_model(ModelConfig(arch="resnet18", in_channels=3), n_out=10)
    f = tmp_path / "w.pt"
    torch.save(src.state_dict(), f)
    dst = build_model(ModelConfig(arch="resnet18", in_channels=1), n_out=2)
    load_local_weights(dst, str(f))  # 3->1 channel averaged, head of another size left alone
    assert torch.allclose(dst.conv1.weight, src.conv1.weight.mean(1, keepdim=True))
    assert torch.equal(dst.layer1[0].conv1.weight, src.layer1[0].conv1.weight)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    import pytest

    from common.errors import ChestFedError

    with pytest.raises(ChestFedError, match="not found"):
        build_model(ModelConfig(weights=str(tmp_path / "nope.pt")), 1)


def test_batchnorm_keys_and_device():
    net = SmallCNN(1, width=4)
    keys = [k for k in net.state_dict() if is_batchnorm_key(k, net)]
    assert keys and all(k.startswith("features.") for k in keys)
    assert any(k.endswith("running_var") for k in keys)
    assert not is_batchnorm_key("head.1.weight", net)
    assert pick_device("auto").type in ("cpu", "cuda")
