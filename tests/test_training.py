import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from chestfed.common.config import ModelConfig, TrainConfig
from chestfed.common.models import SmallCNN, build_model, is_batchnorm_key, load_local_weights, pick_device
from chestfed.common.training import augment, inverse_prevalence, masked_bce, predict, to_input, train_epochs


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, which on a busy
    2-core machine cost 20x (0.3 s -> 7 s for three FedProx runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
        before = predict(net, imgs, torch.device("cpu"))
        stats = train_epochs(net, imgs, y, cfg, epochs=2, seed=7, device=torch.device("cpu"))
        runs.append([p.detach().clone() for p in net.parameters()])
    assert stats.images == 128 and stats.steps == 8
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    after = predict(net, imgs, torch.device("cpu"))
    assert after.shape == (64, 1)
    # it learns: two epochs lift the AUROC of the easy signal well above the untrained net's
    auc_before, auc_after = (roc_auc_score(y[:, 0], s[:, 0]) for s in (before, after))
    assert auc_after > 0.7 and auc_after > auc_before + 0.2, (auc_before, auc_after)


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
    from chestfed.common.errors import ChestFedError

    with pytest.raises(ChestFedError, match="not found"):
        build_model(ModelConfig(weights=str(tmp_path / "nope.pt")), 1)


def test_batchnorm_keys():
    net = SmallCNN(1, width=4)
    keys = [k for k in net.state_dict() if is_batchnorm_key(k, net)]
    assert keys and all(k.startswith("features.") for k in keys)
    assert any(k.endswith("running_var") for k in keys)
    assert not is_batchnorm_key("head.1.weight", net)


def test_pick_device_follows_cuda_availability(monkeypatch):
    from chestfed.common.errors import ChestFedError

    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ChestFedError, match="not a device"):
        pick_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ChestFedError, match="no CUDA device"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)


# --- FedProx's proximal term, class weighting, augmentation: each must change what is trained ------

CPU = torch.device("cpu")


def _noise(n=48, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=g)


def _distance(net, reference):
    return float(torch.sqrt(sum(((p.detach() - g) ** 2).sum() for p, g in zip(net.parameters(), reference))))


def test_larger_proximal_mu_keeps_local_weights_closer_to_the_global_model():
    imgs = _noise()
    y = torch.zeros(48, 1)
    y[:8] = 1
    torch.manual_seed(0)
    start = SmallCNN(1, width=4).state_dict()
    dist = {}
    for mu in (0.0, 1.0, 10.0):
        net = SmallCNN(1, width=4)
        net.load_state_dict(start)
        global_params = [p.detach().clone() for p in net.parameters()]
        train_epochs(net, imgs, y, TrainConfig(batch_size=16, lr=1e-2), epochs=2, seed=3, device=CPU,
                     proximal_mu=mu, global_params=global_params)
        dist[mu] = _distance(net, global_params)
    # same data, seed and start: only the (mu/2)||w - w_global||^2 term differs between the runs
    assert dist[0.0] > 1.5 * dist[1.0] > 1.5 * dist[10.0] > 0, dist


def test_pos_weight_is_the_weighted_bce_of_the_positives():
    logits = torch.tensor([[2.0, -1.0], [-0.5, 0.3], [0.7, 1.5], [-2.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 1.0], [0.0, 0.0]])
    w = torch.tensor([4.0, 0.5])
    loss = masked_bce(logits, target, w)
    # by hand: -[w y log s + (1 - y) log(1 - s)], averaged over the 7 known entries
    s = torch.sigmoid(logits.detach())
    hand, n = 0.0, 0
    for i in range(4):
        for j in range(2):
            t = float(target[i, j])
            if t != t:
                continue
            hand -= float(w[j]) * t * torch.log(s[i, j]) + (1 - t) * torch.log(1 - s[i, j])
            n += 1
    assert n == 7 and float(loss.detach()) == pytest.approx(float(hand) / n, rel=1e-6)
    # the weight scales the gradient of positive entries only: w (s - 1) / n there, s / n on negatives
    loss.backward()
    assert float(logits.grad[0, 0]) == pytest.approx(4.0 * (float(s[0, 0]) - 1) / 7, rel=1e-5)
    assert float(logits.grad[3, 0]) == pytest.approx(float(s[3, 0]) / 7, rel=1e-5)
    assert float(logits.grad[2, 1]) == pytest.approx(0.5 * (float(s[2, 1]) - 1) / 7, rel=1e-5)
    assert float(logits.grad[1, 1]) == 0.0  # masked
    assert float(masked_bce(logits.detach(), target, None)) != pytest.approx(float(loss.detach()))


def test_inverse_prevalence_is_negatives_over_positives_of_the_known_labels():
    y = np.full((120, 5), np.nan)
    y[:2, 0], y[2:8, 0] = 1, 0  # 6 negatives / 2 positives; the rest unknown
    y[:, 1] = 0  # no positive: weight 1
    y[:, 2], y[0, 2] = 0, 1  # 119 / 1: clipped to 100
    y[:, 3], y[0, 3] = 1, 0  # 1 / 119: clipped to 0.1
    # column 4: nothing known, weight 1
    w = inverse_prevalence(y)
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([3.0, 1.0, 100.0, 0.1, 1.0])


def test_pos_weight_moves_a_rare_label_s_scores_to_one_half():
    # Featureless images: the model can only learn a constant score, and the BCE optimum is the
    # prevalence (1/6) unweighted, w*p / (w*p + 1 - p) = 1/2 with w = negatives/positives = 5.
    imgs = torch.full((48, 16, 16), 128, dtype=torch.uint8)
    y = torch.zeros(48, 1)
    y[:8] = 1
    w = inverse_prevalence(y.numpy())
    assert w.tolist() == [5.0]
    mean = {}
    for name, pw in (("none", None), ("inverse_prevalence", w)):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 1))
        train_epochs(net, imgs, y, TrainConfig(batch_size=16, lr=0.03), epochs=30, seed=3, device=CPU,
                     pos_weight=pw)
        mean[name] = float(predict(net, imgs, CPU).mean())
    assert mean["none"] == pytest.approx(1 / 6, abs=0.03), mean
    assert mean["inverse_prevalence"] == pytest.approx(0.5, abs=0.03), mean


def _blobs(n=8, size=32):
    """Smooth images with an off-centre bright disc: a small affine move shifts the disc."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for i in range(n):
        cy, cx = 10 + i, 20 - i
        out.append(((yy - cy) ** 2 + (xx - cx) ** 2 < 25).float() * 200 + 30)
    return torch.stack(out).to(torch.uint8)


def test_augment_moves_pixels_but_keeps_shape_range_and_content():
    x = to_input(_blobs(), 1)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    # bilinear resampling with border padding: convex combinations of the input's pixels
    assert float(out.min()) >= float(x.min()) - 1e-6 and float(out.max()) <= float(x.max()) + 1e-6
    moved = (out - x).abs().flatten(1).max(1).values
    assert bool((moved > 0.2).all()), moved  # every image changed
    # ... by a small transformation: still the same picture
    for a, b in zip(out.flatten(1), x.flatten(1)):
        assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.5
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0)))  # seeded
    assert not torch.allclose(out, augment(x, torch.Generator().manual_seed(1)))


def test_train_augment_changes_the_images_not_the_labels(monkeypatch):
    from chestfed.common import training

    # bright images are positive, dark ones negative: brightness survives a small affine move
    g = torch.Generator().manual_seed(0)
    bright = torch.rand(32, generator=g) < 0.5
    imgs = torch.where(bright[:, None, None], 190, 60).to(torch.uint8).repeat(1, 16, 16)
    imgs = (imgs.int() + torch.randint(-40, 40, imgs.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    y = bright.float()[:, None]
    y[::5] = float("nan")
    y_before = y.clone()
    seen = {}
    real_bce = training.masked_bce
    for aug in (False, True):
        inputs, targets = [], []
        monkeypatch.setattr(training, "masked_bce",
                            lambda logits, t, pw=None: targets.append(t.clone()) or real_bce(logits, t, pw))
        torch.manual_seed(0)
        net = SmallCNN(1, width=4)
        net.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
        train_epochs(net, imgs, y, TrainConfig(batch_size=8, lr=1e-2, augment=aug), epochs=1, seed=5,
                     device=CPU)
        seen[aug] = (inputs, targets, [p.detach().clone() for p in net.parameters()])
    (x_plain, t_plain, w_plain), (x_aug, t_aug, w_aug) = seen[False], seen[True]
    assert len(t_plain) == len(t_aug) == 4
    # the labels reaching the loss are the same, batch for batch (NaN where masked)
    for a, b in zip(t_plain, t_aug):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(-1), b.nan_to_num(-1))
    # the images are not, but each still goes with its own label
    for xp, xa, t in zip(x_plain, x_aug, t_aug):
        assert xp.shape == xa.shape and not torch.allclose(xp, xa)
        known = ~t[:, 0].isnan()
        assert torch.equal((xa.mean((1, 2, 3)) > 0)[known], t[known, 0] == 1)
    assert not all(torch.equal(a, b) for a, b in zip(w_plain, w_aug))
    assert torch.equal(y.isnan(), y_before.isnan()) and torch.equal(y.nan_to_num(-1), y_before.nan_to_num(-1))
