"""The stacked pixel-MLP ensemble: reproduces DiffuseSeg's MLPs, trains exactly like separate MLPs,
learns an easy problem, votes / measures uncertainty as specified, saves and loads."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffuseseg.config import ConfigError, load_config
from diffuseseg.errors import UserError
from diffuseseg.label_formats import ClassList
from diffuseseg.pixel_classifier import (ENSEMBLE_FORMAT, MemberSampler, PixelEnsemble,
                                         derived_seed, feature_pixels, image_uncertainty_score, load_ensemble,
                                         load_diffuseseg_mlps, official_hidden, predict, save_ensemble,
                                         train_ensemble, uncertainty, vote)
from diffuseseg.segmentation import fit


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _random_data(n=150, d=12, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).numpy(), torch.randint(c, (n,), generator=g).numpy()


def test_reproduces_diffuseseg_mlp_logits(seed_fixture):
    ens = PixelEnsemble.from_diffuseseg_state_dicts(seed_fixture["mlp_state_dicts"])
    assert (ens.in_dim, ens.num_classes, ens.members, ens.hidden) == (120, 20, 3, (128, 32))
    assert not ens.training and ens.layer_order == "diffuseseg"
    x = feature_pixels(seed_fixture["features"])  # (B*H*W, d) in (B, H, W) order
    expected = seed_fixture["mlp_logits"].reshape(3, -1, 20)
    torch.testing.assert_close(predict(ens, x, chunk=1000), expected, atol=1e-5, rtol=0)
    # The per-member input form gives the same logits.
    with torch.no_grad():
        torch.testing.assert_close(ens(x.expand(3, -1, -1)), expected, atol=1e-5, rtol=0)
    # And the export is the inverse of the import.
    for mine, theirs in zip(ens.to_member_state_dicts(), seed_fixture["mlp_state_dicts"]):
        assert mine.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], atol=0, rtol=0)


@pytest.mark.parametrize("layer_order", ["official", "diffuseseg"])
def test_forward_matches_member_modules(layer_order):
    ens = PixelEnsemble(12, 5, members=3, hidden=(16, 8), layer_order=layer_order)
    x = torch.randn(3, 20, 12)
    members = ens.to_member_modules()  # train mode, like ens
    logits = ens(x)
    for k, mlp in enumerate(members):
        torch.testing.assert_close(logits[k], mlp(x[k]), atol=1e-5, rtol=0)
    # Running statistics were updated per member, like nn.BatchNorm1d's.
    for k, sd in enumerate(ens.to_member_state_dicts()):
        ref = members[k].state_dict()
        for key in sd:
            torch.testing.assert_close(sd[key], ref[key], atol=1e-6, rtol=1e-5)
    ens.eval()
    shared = torch.randn(30, 12)
    for k, mlp in enumerate(members):
        torch.testing.assert_close(ens(shared)[k], mlp.eval()(shared), atol=1e-5, rtol=0)


def test_layer_orders_differ():
    official = PixelEnsemble(12, 5, members=2, layer_order="official")
    other = PixelEnsemble(12, 5, members=2, layer_order="diffuseseg")
    other.load_state_dict(official.state_dict())  # same names and shapes, same weights
    x = torch.randn(2, 32, 12)
    assert not torch.allclose(official(x), other(x), atol=1e-3)
    assert set(official.to_member_state_dicts()[0]) != set(other.to_member_state_dicts()[0])
    with pytest.raises(ValueError, match="layer_order"):
        PixelEnsemble(12, 5, layer_order="bn-first")


def _adam_close(a: dict, b: dict, skip: set[str]) -> None:
    for key in a:
        if key not in skip:
            torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("layer_order", ["official", "diffuseseg"])
def test_stacked_training_equals_separate_mlps(layer_order):
    features, labels = _random_data(n=150, d=12, c=4)
    e, b, seed = 3, 16, 7
    init = PixelEnsemble(12, 4, members=e, hidden=(16, 8), layer_order=layer_order,
                         generator=torch.Generator().manual_seed(1))
    # One epoch = 10 steps (the last one with 6 pixels: drop_last off), through train_ensemble itself.
    trained = train_ensemble(features, labels, 4, ensemble=copy.deepcopy(init), batch_size=b, max_epochs=1,
                             seed=seed, drop_last=False, progress=False)
    assert trained.train_info["steps"] == 10

    # The same thing by hand: E separate nn.Modules, each its own Adam, the sampler's index sequence.
    members = [m.train() for m in init.to_member_modules()]
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in members]
    x, y = torch.from_numpy(features), torch.from_numpy(labels).long()
    for idx in MemberSampler(len(labels), e, b, derived_seed(seed, 1)).epoch():
        for k, (mlp, opt) in enumerate(zip(members, optimizers)):
            opt.zero_grad()
            F.cross_entropy(mlp(x[idx[k]]), y[idx[k]]).backward()
            opt.step()

    # In the diffuseseg order a Linear's bias feeds a BatchNorm, which removes it: its true gradient is 0,
    # the computed one is rounding noise, which Adam normalises to steps of ~lr with arbitrary sign. So
    # those biases (and the running means that track them) differ by implementation; nothing else does.
    skip = {"fc1.bias", "fc2.bias", "bn1.running_mean", "bn2.running_mean"} if layer_order == "diffuseseg" else set()
    for k, sd in enumerate(trained.to_member_state_dicts()):
        _adam_close(sd, members[k].state_dict(), skip)
    probe = torch.randn(e, 40, 12)
    with torch.no_grad():
        logits = trained.train()(probe)
        for k, mlp in enumerate(members):
            torch.testing.assert_close(logits[k], mlp(probe[k]), atol=2e-5, rtol=1e-4)


def test_members_have_own_init_and_order():
    features, labels = _random_data(n=200, d=8, c=3, seed=2)
    ens = PixelEnsemble(8, 3, members=3, hidden=(16, 8), init="pytorch")
    w = ens.fc1.weight.detach()
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])
    bound = 1 / math.sqrt(8)  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    idx = next(MemberSampler(200, 3, 32, seed=0).epoch())
    assert idx.shape == (3, 32) and not torch.equal(idx[0], idx[1])

    # Identical initial members still end up different: each saw its own sample order.
    same = PixelEnsemble(8, 3, members=3, hidden=(16, 8))
    with torch.no_grad():
        for p in same.parameters():
            p.copy_(p[:1].expand_as(p))
    trained = train_ensemble(features, labels, 3, ensemble=same, batch_size=32, max_epochs=2, progress=False)
    sds = trained.to_member_state_dicts()
    assert not torch.allclose(sds[0]["layers.0.weight"], sds[1]["layers.0.weight"])
    assert not torch.allclose(sds[1]["layers.6.weight"], sds[2]["layers.6.weight"])


def _blobs(n_per_class: int, seed: int, centers: torch.Tensor):
    g = torch.Generator().manual_seed(seed)
    c, d = centers.shape
    y = torch.arange(c).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(len(y), d, generator=g)
    return x.numpy().astype(np.float16), y.numpy()  # float16 like stored features


def test_learns_gaussian_blobs():
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))  # ~99% separable
    x_train, y_train = _blobs(400, 1, centers)
    x_test, y_test = _blobs(250, 2, centers)
    ens = train_ensemble(x_train, y_train, 4, members=4, max_epochs=4, seed=0, progress=False)
    logits = predict(ens, x_test)
    assert logits.shape == (4, 1000, 4)
    for mode in ("majority", "mean_softmax"):
        accuracy = (vote(logits, mode).numpy() == y_test).mean()
        assert accuracy > 0.95, (mode, accuracy)
    # The members disagree more on the pixels the ensemble gets wrong.
    js, right = uncertainty(logits), vote(logits).numpy() == y_test
    assert js.shape == (1000,) and (js >= 0).all()
    assert js[~right].mean() > 2 * js[right].mean()


def test_class_balanced_sampling():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    sampler = MemberSampler(len(labels), 2, 100, seed=0, labels=labels)
    drawn = torch.cat([idx.reshape(-1) for idx in sampler.epoch()])
    share = np.bincount(labels[drawn.numpy()], minlength=3) / drawn.numel()
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.05)
    # Training with it runs and predicts the rare class.
    x = np.random.default_rng(0).normal(size=(1000, 6)).astype(np.float32)
    x[labels == 2] += 4
    ens = train_ensemble(x, labels, 3, members=2, max_epochs=2, class_balanced=True, progress=False)
    assert (vote(predict(ens, x[labels == 2])) == 2).float().mean() > 0.5


def test_stopping_matches_official_rule_per_member():
    """Each member stops as the official loop would stop it trained alone, and stays frozen after."""
    features, labels = _random_data(n=96, d=6, c=3, seed=3)  # noise: the loss soon stops improving
    e, b, patience, min_epochs, max_epochs, seed = 3, 16, 4, 1, 40, 5
    init = PixelEnsemble(6, 3, members=e, hidden=(8, 8), generator=torch.Generator().manual_seed(0))
    trained = train_ensemble(features, labels, 3, ensemble=copy.deepcopy(init), batch_size=b, patience=patience,
                             min_epochs=min_epochs, max_epochs=max_epochs, seed=seed, progress=False)
    stopped = trained.train_info["stopped_at"]
    assert all(s is not None for s in stopped), stopped
    assert len({s for s in stopped}) > 1, "want members stopping at different steps (freezing exercised)"

    # Official train_interpreter.py, one model at a time, with this member's batches.
    sampler = MemberSampler(len(labels), e, b, derived_seed(seed, 1))
    epochs = [list(sampler.epoch()) for _ in range(max_epochs)]
    x, y = torch.from_numpy(features), torch.from_numpy(labels).long()
    for k, mlp in enumerate(init.to_member_modules()):
        mlp.train()
        opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
        best, break_count, stop, step = 1e7, 0, False, 0
        for epoch in range(max_epochs):
            for idx in epochs[epoch]:
                opt.zero_grad()
                loss = F.cross_entropy(mlp(x[idx[k]]), y[idx[k]])
                loss.backward()
                opt.step()
                step += 1
                if epoch > min_epochs - 1:
                    if loss.item() < best:
                        best, break_count = loss.item(), 0
                    else:
                        break_count += 1
                    if break_count > patience:
                        stop = True
                        break
            if stop:
                break
        assert stopped[k] == (epoch, step)
        _adam_close(trained.to_member_state_dicts()[k], mlp.state_dict(), set())


def test_default_init_is_official():
    """N(0, 0.02) weights and zero biases (official init_weights), each member its own draws."""
    ens = PixelEnsemble(64, 5, members=4, hidden=(128, 32), generator=torch.Generator().manual_seed(0))
    w = ens.fc1.weight.detach()
    assert w.std().item() == pytest.approx(0.02, rel=0.05) and abs(w.mean().item()) < 1e-3
    assert not torch.allclose(w[0], w[1])
    for layer in (ens.fc1, ens.fc2, ens.fc_out):
        assert torch.count_nonzero(layer.bias) == 0


def test_official_hidden_sizes_follow_the_class_count(tmp_path):
    assert official_hidden(29) == (128, 32) and official_hidden(30) == (256, 128)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 6, generator=g).numpy(), (torch.arange(128) % 40).numpy()
    wide = train_ensemble(x, y, 40, members=2, max_epochs=1, progress=False)
    assert wide.hidden == (256, 128) and wide.fc2.weight.shape == (2, 256, 128)
    assert train_ensemble(x, y % 5, 5, members=2, max_epochs=1, progress=False).hidden == (128, 32)
    assert PixelEnsemble(6, 40).hidden == (256, 128) and PixelEnsemble(6, 40, hidden=(8, 4)).hidden == (8, 4)
    loaded, _ = load_ensemble(save_ensemble(tmp_path / "wide.pt", wide))  # the file keeps its sizes
    assert loaded.hidden == (256, 128)

    # The config: [] = official sizes, [h1, h2] overrides (through segmentation.fit), anything else is refused.
    classes = ClassList([f"c{i}" for i in range(40)], np.zeros((40, 3), np.uint8))
    spec = type("Spec", (), {"to_dict": lambda self: {}})()
    for hidden, expected in (("[]", (256, 128)), ("[16,8]", (16, 8))):
        cfg = load_config(None, [f"ensemble.hidden={hidden}", "ensemble.members=2", "ensemble.max_epochs=1"])
        assert fit(cfg, x, y, classes, spec, progress=False)[0].hidden == expected
    for bad in ("[16]", "[16,8,4]", "[16,0]"):
        with pytest.raises(ConfigError, match="ensemble.hidden"):
            load_config(None, [f"ensemble.hidden={bad}"])


def test_drop_last_skips_the_partial_batch_of_every_epoch():
    """Official DataLoader(drop_last=True): N pixels, batch B -> N // B steps per epoch, all of B pixels."""
    features, labels = _random_data(n=150, d=6, c=3)  # 150 = 9 * 16 + 6
    for balanced in (False, True):
        sampler = MemberSampler(150, 2, 16, labels=labels if balanced else None, drop_last=True)
        batches = list(sampler.epoch())
        assert len(sampler) == len(batches) == 150 // 16 and all(b.shape == (2, 16) for b in batches)
        assert len(list(MemberSampler(150, 2, 16, labels=labels if balanced else None).epoch())) == 10
    kwargs = dict(members=2, batch_size=16, max_epochs=3, patience=10_000, progress=False)
    assert train_ensemble(features, labels, 3, **kwargs).train_info["steps"] == 3 * (150 // 16)
    assert train_ensemble(features, labels, 3, drop_last=False, **kwargs).train_info["steps"] == 3 * 10
    cfg = load_config(None, ["ensemble.batch_size=16", "ensemble.max_epochs=3", "ensemble.members=2",
                             "ensemble.min_steps=100000"])
    classes = ClassList(["a", "b", "c"], np.zeros((3, 3), np.uint8))
    spec = type("Spec", (), {"to_dict": lambda self: {}})()
    assert fit(cfg, features, labels, classes, spec, progress=False)[0].train_info["steps"] == 27
    with pytest.raises(UserError, match="fewer than one mini-batch"):
        train_ensemble(features[:10], labels[:10], 3, batch_size=16, progress=False)


def test_min_steps_holds_the_stopping_rule_back_until_that_step():
    """ensemble.min_steps: the patience counter starts at step min_steps, so no member stops before
    min_steps + patience + 1 steps, even where the rule alone stops every member much earlier."""
    features, labels = _random_data(n=160, d=6, c=3)  # noisy labels: the loss stops improving at once
    kwargs = dict(members=3, batch_size=16, max_epochs=40, patience=2, progress=False)  # 10 steps per epoch
    early = train_ensemble(features, labels, 3, min_steps=0, **kwargs).train_info["stopped_at"]
    assert all(s is not None and s[1] < 100 for s in early), early  # the rule alone fires early
    late = train_ensemble(features, labels, 3, min_steps=100, **kwargs).train_info["stopped_at"]
    assert all(s is not None and s[1] >= 100 + 2 + 1 for s in late), late
    # The same through the config (segmentation.fit, which train_mlps.py and the studies use).
    classes = ClassList(["a", "b", "c"], np.zeros((3, 3), np.uint8))
    spec = type("Spec", (), {"to_dict": lambda self: {}})()
    stops = {}
    for min_steps in (0, 100):
        cfg = load_config(None, ["ensemble.batch_size=16", "ensemble.max_epochs=40", "ensemble.members=3",
                                 "ensemble.patience=2", f"ensemble.min_steps={min_steps}"])
        stops[min_steps] = [s[1] for s in fit(cfg, features, labels, classes, spec, progress=False)[0]
                            .train_info["stopped_at"]]
    assert max(stops[0]) < 100 and min(stops[100]) >= 103, stops


def test_training_input_errors():
    features, labels = _random_data(n=20, d=4, c=3)
    with pytest.raises(UserError, match="outside"):
        train_ensemble(features, np.where(labels == 0, 255, labels), 3, progress=False)
    with pytest.raises(UserError, match="labels"):
        train_ensemble(features, labels[:10], 3, progress=False)


def test_vote_and_uncertainty_on_hand_made_logits():
    big = 50.0
    # 3 members x 4 pixels x 3 classes
    logits = torch.zeros(3, 4, 3)
    logits[:, 0] = torch.tensor([0.3, 2.0, -1.0])               # unanimous, identical -> JS 0
    logits[:, 1] = torch.tensor([[0, 0, 3.0], [0, 0, 2.0], [4.0, 0, 0]])  # 2 vs 1 -> majority 2
    logits[:, 2] = torch.tensor([[0, 3.0, 0], [3.0, 0, 0], [0, 0, 3.0]])  # three-way tie -> lowest id 0
    logits[:, 3] = torch.tensor([[big, 0, 0], [0, 0.1, 0], [0, 0.1, 0]])  # majority 1, mean softmax 0
    np.testing.assert_array_equal(vote(logits, "majority").numpy(), [1, 2, 0, 1])
    np.testing.assert_array_equal(vote(logits, "mean_softmax").numpy(), [1, 2, 0, 0])
    js = uncertainty(logits)
    assert js[0].abs() < 1e-6 and (js[1:] > 0.05).all()
    # A 2-2 tie between classes 2 and 1 goes to the lower id, 1.
    tie = torch.tensor([[[0, 0, 1.0]], [[0, 1.0, 0]], [[0, 0, 1.0]], [[0, 1.0, 0]]])
    assert vote(tie).tolist() == [1]
    # Two certain members that disagree: JS = ln 2 (natural log).
    split = torch.tensor([[[big, -big]], [[-big, big]]])
    assert uncertainty(split).item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="vote mode"):
        vote(logits, "median")


def test_image_uncertainty_score_is_top_decile_mean():
    assert image_uncertainty_score(torch.arange(100.0)) == pytest.approx(94.5)  # mean of 90..99
    assert image_uncertainty_score(torch.arange(5.0)) == pytest.approx(2.0)     # < 10 pixels: all (official)


def test_save_load_round_trip(tmp_path):
    ens = PixelEnsemble(10, 4, members=3, hidden=(16, 8), layer_order="diffuseseg")
    ens(torch.randn(3, 8, 10))  # non-trivial running stats
    meta = {"class_names": ["a", "b", "c", "d"], "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]],
            "feature_spec": {"timesteps": (50, 150), "blocks": ("ups.0",), "dim": 10}}
    path = save_ensemble(tmp_path / "ensemble.pt", ens, meta)
    loaded, loaded_meta = load_ensemble(path)
    assert loaded_meta == meta and loaded.config() == ens.config() and not loaded.training
    for key, value in ens.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(7, 10)
    torch.testing.assert_close(predict(loaded, x), predict(ens, x), atol=0, rtol=0)
    assert torch.load(path, weights_only=True)["format"] == ENSEMBLE_FORMAT

    for bad in (object(), np.float64(0.5)):  # neither loads back with weights_only=True
        with pytest.raises(TypeError, match="meta"):
            save_ensemble(tmp_path / "bad.pt", ens, {"spec": bad})
    assert not (tmp_path / "bad.pt").exists()
    mlp_file = tmp_path / "mlp_1_best.pt"
    torch.save(ens.to_member_state_dicts()[0], mlp_file)
    with pytest.raises(UserError, match="mlp_1_best.pt.*not a pixel ensemble.*single pixel MLP"):
        load_ensemble(mlp_file)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="junk.pt"):
        load_ensemble(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="not found"):
        load_ensemble(tmp_path / "missing.pt")


def test_member_files_in_both_namings(tmp_path):
    official = PixelEnsemble(6, 3, members=2, hidden=(8, 4))
    sds = official.to_member_state_dicts()
    assert "layers.0.weight" in sds[0] and sds[0]["layers.0.weight"].shape == (8, 6)
    # Official train_interpreter.py checkpoints: {'model_state_dict': DataParallel state dict}.
    wrapped = [{"model_state_dict": {f"module.{k}": v for k, v in sd.items()}} for sd in sds]
    back = PixelEnsemble.from_member_state_dicts(wrapped)
    assert back.layer_order == "official"
    x = torch.randn(5, 6)
    torch.testing.assert_close(predict(back, x), predict(official, x))
    with pytest.raises(UserError, match="not DiffuseSeg"):
        PixelEnsemble.from_diffuseseg_state_dicts(sds)

    ds = PixelEnsemble(6, 3, members=2, hidden=(8, 4), layer_order="diffuseseg").to_member_state_dicts()
    paths = []
    for k, sd in enumerate(ds):
        paths.append(tmp_path / f"mlp_{k + 1}_best.pt")
        torch.save(sd, paths[-1])
    assert load_diffuseseg_mlps(paths).members == 2
    ds[1] = {k: v for k, v in ds[1].items() if k != "bn2.running_var"}
    torch.save(ds[1], paths[1])
    with pytest.raises(UserError, match="mlp_2_best.pt.*bn2.running_var"):
        load_diffuseseg_mlps(paths)
    with pytest.raises(UserError, match="mix"):
        PixelEnsemble.from_member_state_dicts([sds[0], ds[0]])
