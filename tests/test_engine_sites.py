"""Site names, TransformerLens aliases, token selectors and basis validation (no model needed)."""

from __future__ import annotations

import pytest
import torch

from projlens_mi.engine.sites import (AllTokens, ImageTokens, ImageWindow, Indices, LastToken, PatchRegion, Site,
                                      TextTokens, TokenContext, canonical, check_basis, order_key)
from projlens_mi.errors import ProjLensError

# two rows of 8 positions: row 0 = [pad, bos, img x4, txt, txt], row 1 = [bos, txt, img x4, txt, txt]
IMG = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
ATT = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
LLM = TokenContext(n_tokens=8, image_point=False, image_mask=IMG, attention_mask=ATT)
PROJ = TokenContext(n_tokens=16, image_point=True)


def test_canonical_names_and_aliases():
    assert canonical("blocks.3.hook_resid_post") == "llm.3.resid_post"
    assert canonical("vision_projector.hook_out") == "projector.out"
    assert canonical("hook_embed") == "llm.embed" == canonical("embed.hook_out")
    assert canonical("blocks.2.attn.hook_out") == "llm.2.attn_out"
    assert canonical("blocks.0.hook_in") == "llm.0.resid_pre" and canonical("blocks.0.hook_out") == "llm.0.resid_post"
    assert canonical("llm.0.attn_out", n_layers=2) == "llm.0.attn_out"
    assert Site("blocks.1.hook_mlp_out") == Site("llm.1.mlp_out")
    with pytest.raises(ProjLensError, match=r"unknown site 'proj.out'; valid sites: llm.embed, vision.out, "
                                            r"projector.in, projector.hidden, projector.out, logits, llm.\{0..1\}"):
        canonical("proj.out", n_layers=2)
    with pytest.raises(ProjLensError, match="out of range"):
        canonical("llm.2.resid_pre", n_layers=2)


def test_forward_order():
    names = ["logits", "llm.1.resid_pre", "llm.0.resid_post", "llm.0.mlp_out", "projector.out", "llm.0.attn_out",
             "projector.in", "llm.embed", "llm.0.resid_pre", "projector.hidden", "vision.out"]
    assert sorted(names, key=order_key) == [
        "llm.embed", "vision.out", "projector.in", "projector.hidden", "projector.out", "llm.0.resid_pre",
        "llm.0.attn_out", "llm.0.mlp_out", "llm.0.resid_post", "llm.1.resid_pre", "logits"]


def test_selectors_at_llm_points():
    assert AllTokens().indices(LLM, 2) is None
    assert ImageTokens().indices(LLM, 2).tolist() == [[2, 3, 4, 5]] * 2
    assert ImageWindow(1, 3).indices(LLM, 2).tolist() == [[3, 4]] * 2
    assert LastToken().indices(LLM, 2).tolist() == [[7], [7]]
    assert Indices(0, -1).indices(LLM, 2).tolist() == [[0, 7]] * 2
    assert PatchRegion((0, 1), (0, 2)).indices(LLM, 2).tolist() == [[2, 3]] * 2   # 2x2 grid, top row


def test_text_tokens_need_equal_counts():
    with pytest.raises(ProjLensError, match=r"picks 3 tokens in row 0 but 4 in row 1"):
        TextTokens().indices(LLM, 2)
    ctx = TokenContext(8, False, IMG, torch.ones(2, 8, dtype=torch.long))
    assert TextTokens().indices(ctx, 2).tolist() == [[0, 1, 6, 7]] * 2


def test_selectors_at_projector_points():
    assert ImageTokens().indices(PROJ, 3).tolist() == [list(range(16))] * 3
    assert PatchRegion(1, (2, 4)).indices(PROJ, 1).tolist() == [[6, 7]]
    assert PatchRegion((2, 4), 0).indices(PROJ, 1).tolist() == [[8, 12]]
    assert ImageWindow(14, 99).indices(PROJ, 1).tolist() == [[14, 15]]


@pytest.mark.parametrize("sel,ctx,msg", [
    (ImageWindow(20, 30), PROJ, "matches no token: the image has 16 tokens"),
    (PatchRegion(5, 5), PROJ, "matches no token: the patch grid is 4x4"),
    (LastToken(), PROJ, "selects nothing at an image point"),
    (TextTokens(), PROJ, "matches no token at an image point"),
    (Indices(8), LLM, "matches no token: positions must lie in -8..7"),
    (ImageTokens(), TokenContext(8, False, torch.zeros(2, 8, dtype=torch.bool), ATT), "matches no token in row 0"),
    (PatchRegion(0, 0), TokenContext(15, True), "not a square grid"),
])
def test_selector_matching_no_token_is_a_one_line_error(sel, ctx, msg):
    with pytest.raises(ProjLensError, match=msg) as e:
        sel.indices(ctx, 2)
    assert "\n" not in str(e.value)


def test_basis_validation():
    q = torch.linalg.qr(torch.randn(6, 2)).Q
    assert check_basis(q, 6) is q
    with pytest.raises(ProjLensError, match=r"2-D tensor \[d, k\].*got \(6,\)"):
        check_basis(torch.ones(6))
    with pytest.raises(ProjLensError, match="has 6 rows but the activation has d=8"):
        check_basis(q, 8)
    with pytest.raises(ProjLensError, match=r"not orthonormal \(max \|B\^T B - I\| = 3\)"):
        check_basis(2 * q)
    with pytest.raises(ProjLensError, match="need 1 <= k <= d"):
        check_basis(torch.eye(3, 4))
    with pytest.raises(ProjLensError, match="not orthonormal"):
        Site("projector.out", basis=torch.ones(6, 2))
    with pytest.raises(ProjLensError, match="must be a selector"):
        Site("projector.out", tokens="image")
