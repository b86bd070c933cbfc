"""Autoencoders (image / causal video / audio), discriminators and losses."""

import pytest
import torch

from vqtok.config import load_config
from vqtok.losses import (MissingWeightsError, PerceptualLoss, adaptive_weight, check_lpips_weights, hinge_d_loss,
                          hinge_g_loss, multi_resolution_stft_loss, reconstruction_loss)
from vqtok.models import build_autoencoder, build_discriminator

TINY = {
    "image": ["model.channels=4", "model.channel_mult=[1,2,2]", "model.downsample=4", "model.latent_dim=8"],
    "video": ["model.modality=video", "model.channels=4", "model.channel_mult=[1,2,2]", "model.downsample=4",
              "model.latent_dim=8", "data.frames=5", "data.size=16"],
    "audio": ["model.modality=audio", "model.channels=2", "model.strides=[2,4]", "model.latent_dim=8"],
}


def tiny_model(modality, quantizer=("quantizer.name=fsq", "quantizer.levels=[4,4,3]", "quantizer.backend=torch")):
    cfg = load_config(None, None, TINY[modality] + list(quantizer)).to_dict()
    return build_autoencoder(cfg).eval()


@pytest.mark.parametrize("modality,shape,grid", [
    ("image", (2, 3, 16, 24), (4, 6)),
    ("video", (2, 3, 9, 16, 16), (3, 4, 4)),
    ("audio", (2, 1, 64), (8,)),
])
def test_shapes_encode_decode(modality, shape, grid):
    model = tiny_model(modality)
    x = torch.rand(shape) * 2 - 1
    out = model(x)
    assert model.modality == modality and out.recon.shape == x.shape
    idx = model.encode(x)
    assert idx.dtype == torch.int64 and idx.shape == (2, *grid) == (2, *model.token_grid(shape[1:]))
    assert torch.equal(idx, out.quant.indices)
    assert 0 <= int(idx.min()) and int(idx.max()) < model.quantizer.codebook_size
    # decode(encode(x)) is the (clamped) forward reconstruction
    torch.testing.assert_close(model.decode(idx), out.recon.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_residual_quantizer_adds_depth_axis():
    model = tiny_model("image", ["quantizer.name=rvq", "quantizer.dim=8", "quantizer.codebook_size=16",
                                 "quantizer.num_quantizers=3"])
    idx = model.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert idx.shape == (1, 4, 4, 3) == (1, *model.token_grid((3, 16, 16)))


def test_token_grid_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple"):
        tiny_model("image").token_grid((3, 18, 16))
    with pytest.raises(ValueError, match="1 \\+ a multiple"):
        tiny_model("video").token_grid((3, 8, 16, 16))


def test_video_is_causal_and_first_frame_is_encoded_alone():
    torch.manual_seed(1)
    model = tiny_model("video")
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    z_clip = model.quant_conv(model.encoder(x))
    z_first = model.quant_conv(model.encoder(x[:, :, :1]))
    torch.testing.assert_close(z_clip[:, :, :1], z_first, rtol=1e-5, atol=1e-5)
    # changing the last frames leaves earlier latents (and outputs) unchanged
    y = x.clone()
    y[:, :, 5:] = 0
    z_y = model.quant_conv(model.encoder(y))
    torch.testing.assert_close(z_clip[:, :, :2], z_y[:, :, :2], rtol=1e-5, atol=1e-5)
    r_x, r_y = model(x).recon, model(y).recon
    torch.testing.assert_close(r_x[:, :, :5], r_y[:, :, :5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modality,shape", [("image", (2, 3, 32, 32)), ("video", (1, 3, 5, 32, 32)), ("audio", (2, 1, 4096))])
def test_discriminators(modality, shape):
    disc = build_discriminator(modality, channels=8, layers=2)
    x = torch.randn(shape)
    logits = disc(x)
    assert isinstance(logits, list) and logits and all(t.shape[0] == shape[0] for t in logits)
    d = hinge_d_loss(disc(x), disc(x + 1))
    d.backward()
    assert torch.isfinite(d) and any(p.grad is not None for p in disc.parameters())


def test_losses():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full_like(x, 0.5)
    assert reconstruction_loss(y, x, "l1").item() == pytest.approx(0.5)
    assert reconstruction_loss(y, x, "l2").item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="loss.rec"):
        reconstruction_loss(y, x, "l3")
    wav = torch.sin(torch.linspace(0, 400, 2048)).reshape(1, 1, -1)
    assert multi_resolution_stft_loss(wav, wav).item() < 1e-4
    assert multi_resolution_stft_loss(wav * 0.5, wav).item() > 0.1
    assert hinge_g_loss([torch.ones(2, 1)]).item() == -1.0
    assert hinge_d_loss([torch.ones(3)], [-torch.ones(3)]).item() == 0.0


def test_adaptive_weight_balances_gradient_norms():
    w = torch.randn(4, 4, requires_grad=True)
    rec = (w * 3).sum()          # grad norm 3 * 4 = 12
    g = (w * 0.5).sum()          # grad norm 0.5 * 4 = 2
    assert adaptive_weight(rec, g, w).item() == pytest.approx(12 / (2 + 1e-4), rel=1e-5)


def test_lpips_missing_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth") as e:
        check_lpips_weights("alex")
    assert str(tmp_path) in str(e.value)
    with pytest.raises(MissingWeightsError):
        PerceptualLoss("alex", pretrained=True)


def test_lpips_code_path_random_weights():
    loss = PerceptualLoss("alex", pretrained=False)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x, -x).item() > 0
