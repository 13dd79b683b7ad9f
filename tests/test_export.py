"""`sandbox export`: a finished tiny cell's final bank, written per slot as PEFT LoRA adapters (and as a
stacked safetensors bank), loads into PEFT on the equivalent module layout and reproduces the tool's
own forward: one-hot gates e_k == adapter k alone; constant gates g == every adapter at scale g_k."""

from __future__ import annotations

import json

import pytest
import torch

from sandbox.app.cli import main
from substrate.cell import FINAL, CellConfig, prepare_substrate, run_cell
from substrate.export import load_final, plain_model, write_export
from substrate.model import GPT, load_banks

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

TINY = dict(preset="tiny", steps=6, batch=4, slots=4, rank=4, eval_every=3, checkpoint_every=0, interval=3,
            min_age=0, fit_windows=2, eval_windows=4, seed=5)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("cache")
    cfg = CellConfig.of(**TINY, cell="L+R")
    sub = prepare_substrate(cfg, cache)
    out = tmp_path_factory.mktemp("run") / "seed-5"
    res = run_cell(cfg, out, substrate=sub)
    assert res.done
    return out


def tool_model(final):
    from substrate.export import model_config

    m = GPT(model_config(final), torch.Generator().manual_seed(0))
    m.load_state_dict(final["base"], strict=False)
    load_banks(m, final["banks"])
    return m.eval()


def test_full_keeps_the_final_bank_and_it_is_the_trained_one(finished):
    final = load_final(finished)
    assert (finished / FINAL).is_file() and not (finished / "checkpoint.pt").exists()
    A, B = next(iter(final["banks"].values()))
    assert A.shape == (4, 4, 64) and float(B.abs().sum()) > 0   # trained away from LoRA's B = 0 start
    metrics = json.loads((finished / "metrics.json").read_text())
    assert final["config"] == CellConfig.of(**TINY, cell="L+R").identity() and final["step"] == metrics["steps"]


def test_peft_slots_reproduce_the_tool_forward(finished, tmp_path):
    from peft import PeftModel

    final = load_final(finished)
    files = write_export(final, tmp_path / "peft", "peft")
    assert len(files) == 4 * 2 + 4
    tool = tool_model(final)
    idx = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    K = 4
    with torch.no_grad():
        plain = plain_model(tool.cfg, final["base"])(idx)
        assert torch.equal(plain, tool(idx))                                   # the layout is the base, exactly
        model = PeftModel.from_pretrained(plain_model(tool.cfg, final["base"]), str(tmp_path / "peft" / "slot-00"),
                                          adapter_name="slot-00")
        for k in range(1, K):
            model.load_adapter(str(tmp_path / "peft" / f"slot-{k:02d}"), adapter_name=f"slot-{k:02d}")
        worst = 0.0
        for k in range(K):
            model.set_adapter(f"slot-{k:02d}")
            gates = torch.nn.functional.one_hot(torch.tensor(k), K).float().view(1, 1, K)
            want = tool(idx, gates)
            got = model(idx)
            assert not torch.allclose(want, plain, atol=1e-4)                  # the slot changes the output
            worst = max(worst, float((got - want).abs().max()))
        assert worst < 1e-5, worst
        # A token-independent mixture: every adapter active, adapter k's scale times g_k.
        g = torch.tensor([0.7, 0.1, 0.5, 0.2])
        model.base_model.set_adapter([f"slot-{k:02d}" for k in range(K)])
        from peft.tuners.lora import LoraLayer

        for mod in model.modules():
            if isinstance(mod, LoraLayer):
                for k in range(K):
                    mod.set_scale(f"slot-{k:02d}", float(g[k]))
        mix = (model(idx) - tool(idx, g.view(1, 1, K))).abs().max()
        assert float(mix) < 1e-5, float(mix)
    print(f"PEFT vs tool forward: max abs diff {worst:.3g} (one slot), {float(mix):.3g} (mixture)")


def test_safetensors_bank_and_router_round_trip(finished, tmp_path):
    final = load_final(finished)
    write_export(final, tmp_path / "st", "safetensors", base=False)
    bank = safetensors_torch.load_file(str(tmp_path / "st" / "bank.safetensors"))
    for name, (A, B) in final["banks"].items():
        assert torch.equal(bank[f"{name}.A"], A) and torch.equal(bank[f"{name}.B"], B)
    router = safetensors_torch.load_file(str(tmp_path / "st" / "router.safetensors"))
    assert router.keys() == final["router"].keys() and all(torch.equal(router[k], final["router"][k]) for k in router)
    meta = json.loads((tmp_path / "st" / "router.json").read_text())
    assert meta["config"]["kind"] == "sigmoid" and meta["features"] == "hidden"
    assert not (tmp_path / "st" / "base.safetensors").exists()


def test_cli_exports_every_seed_and_refuses_a_folder_without_final(finished, tmp_path, capsys):
    assert main(["export", str(finished.parent), "--format", "peft", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / finished.name / "slot-03" / "adapter_config.json").is_file()
    assert (tmp_path / "o" / finished.name / "base.safetensors").is_file()
    empty = tmp_path / "seed-1"
    empty.mkdir()
    (empty / "metrics.json").write_text("{}")
    assert main(["export", str(empty)]) == 2
    assert "final.pt" in capsys.readouterr().err
    assert main(["export", str(finished), "--format", "onnx"]) == 2
