"""Gradient checkpointing and input cloning for modules we do not own (plain torch).

The blocks here copy the traps of ComfyUI's Flux blocks: a DoubleStreamBlock is called with keyword-only
tensors (``img=``, ``txt=``) and adds into ``txt`` in place after a LayerNorm saved it for backward; a
SingleStreamBlock takes its tensor positionally and adds into it in place.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lab.trainer.training.gradient_checkpointing import clone_inputs_of, gradient_checkpointing


class KeywordBlock(nn.Module):
    """Like Flux's DoubleStreamBlock: keyword-only tensors, ``txt += ...`` after a norm saw txt."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.txt_norm = nn.LayerNorm(width)
        self.txt_lin = nn.Linear(width, width)
        self.img_lin = nn.Linear(width, width)

    def forward(self, *, img, txt, vec, scale=1.0):
        txt_mod = self.txt_lin(self.txt_norm(txt)) * (1 + vec)
        img = img + self.img_lin(img) * scale + txt_mod.mean(dim=1, keepdim=True)
        txt += txt_mod
        return img, txt


class PositionalBlock(nn.Module):
    """Like Flux's SingleStreamBlock: ``x`` positional, the rest by keyword, ``x += ...`` after a norm saw x."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.pre_norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, x, vec):
        x += torch.tanh(self.linear(self.pre_norm(x))) * vec
        return x


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.txt_in, self.img_in = nn.Linear(8, 8), nn.Linear(8, 8)
        self.double_blocks = nn.ModuleList([KeywordBlock(), KeywordBlock()])
        self.single_blocks = nn.ModuleList([PositionalBlock(), PositionalBlock()])

    def forward(self, img, txt, vec):
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec=vec)
        return x[:, txt.shape[1]:]


def loss_and_gradients(checkpointing: bool):
    model = Model()
    blocks = [*model.double_blocks, *model.single_blocks]
    norms = [m for block in blocks for m in block.modules() if isinstance(m, nn.LayerNorm)]
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(2, 4, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    vec = torch.randn(2, 1, 8, generator=g, requires_grad=True)
    with clone_inputs_of(norms), gradient_checkpointing(blocks, enabled=checkpointing) as wrapped:
        assert wrapped == (4 if checkpointing else 0)
        loss = model(img, txt, vec).pow(2).mean()
        loss.backward()
    for module in model.modules():
        assert "forward" not in vars(module) and not module._forward_pre_hooks, "a wrapper or hook was left behind"
    gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.item(), gradients, vec.grad.clone()


def test_keyword_only_tensors_give_the_same_gradients_with_and_without_checkpointing():
    plain_loss, plain, plain_vec = loss_and_gradients(checkpointing=False)
    checkpointed_loss, checkpointed, checkpointed_vec = loss_and_gradients(checkpointing=True)
    assert checkpointed_loss == plain_loss
    assert plain.keys() == checkpointed.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name, gradient in plain.items():
        assert torch.allclose(checkpointed[name], gradient, rtol=1e-6, atol=1e-7), name
    assert torch.allclose(checkpointed_vec, plain_vec, rtol=1e-6, atol=1e-7)


def test_a_checkpointed_block_leaves_its_keyword_and_positional_inputs_as_they_were():
    keyword, positional = KeywordBlock(), PositionalBlock()
    txt, x, vec = torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 1, 8, requires_grad=True)
    txt_before, x_before = txt.clone(), x.clone()
    with gradient_checkpointing([keyword, positional]):
        _, txt_out = keyword(img=torch.randn(1, 2, 8), txt=txt, vec=vec, scale=0.5)   # non-tensor kwargs pass through
        x_out = positional(x, vec=vec)
        (txt_out.sum() + x_out.sum()).backward()
    assert torch.equal(txt, txt_before) and torch.equal(x, x_before), "checkpoint recomputes from these"
    assert vec.grad is not None


def test_without_the_clones_the_in_place_add_breaks_backward():
    """Why clone_inputs_of exists: the norm saved ``txt``, then ``txt += ...`` changed it."""
    block = KeywordBlock()
    txt = torch.randn(1, 3, 8, requires_grad=True).clone()
    img, txt_out = block(img=torch.randn(1, 2, 8), txt=txt, vec=torch.zeros(1, 1, 8))
    with pytest.raises(RuntimeError, match="inplace"):
        (img.sum() + txt_out.sum()).backward()
