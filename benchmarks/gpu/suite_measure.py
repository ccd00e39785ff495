"""The phases of the GPU suite (gpu_suite.py) that measure beside the ladder's step times: diffusers' baseline, the
on-device exactness checks, the FP8 drift and quantizer check, the end-to-end edits, the fewer-calls options'
step times and the profiles; with the estimates of the longer ones (what the deadline checks before running them).

MeasurePhases is a part of gpu_suite.Suite (its base class): its methods read the Suite's fields and its ladder's
helpers (denoiser, loop, time_loop, steps, ops_for), one method per phase, as gpu_suite's core() runs them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the suite's parts and the rungs, by plain name
import suite_parts as parts  # noqa: E402
from rungs import BY_NAME, Rung  # noqa: E402

HOISTED, GRAPHS = BY_NAME["hoisted"], BY_NAME["graphs"]  # what the exactness checks compare


def require(checks: dict) -> None:
    """A check that does not hold fails its phase (and so the run), after it was recorded."""
    if failed := [name for name, ok in checks.items() if not ok]:
        raise AssertionError(f"check(s) failed on this device: {', '.join(failed)}")


class MeasurePhases:
    """The measuring phases of gpu_suite.Suite."""

    def baseline(self):
        """diffusers' transformer, built once, timed on both layouts, then freed before ours is drawn."""
        ref = parts.random_diffusers(self.cfg, self.device, self.dtype)
        out = self.result.setdefault("diffusers", {})
        for key, layout in self.layouts.items():
            data = parts.inputs(self.cfg, layout, self.device, self.dtype)
            parts.reset_peak(self.device)
            run = parts.diffusers_loop(ref, self.cfg, layout, data, self.device, self.dtype)
            ms, host = self.time_loop(run, data)
            out[key] = {"ms_per_step": ms, "host_ms_per_step": host, "peak_gib": parts.peak_gib(self.device)}
            if key == "kontext":  # where its step goes, beside the eager rung's (same torch ops, 10% apart)
                self.result.setdefault("profile", {})["diffusers"] = parts.profile_steps(run, *data, self.device)
            self.record.write()
        del ref, run, data  # the loop's closure holds the model too: 24 GB freed before ours is drawn
        parts.free_memory(self.device)

    def checks(self):
        """Hoisted == per-step (over the hoisted rung's ops), graphs == no graphs; the eager norm + RoPE's bits."""
        graphs = self.denoiser(GRAPHS) if self.capture is not None else None
        found = parts.exactness(
            self.model,
            self.ops[HOISTED.backend],
            self.dtype,
            self.data["kontext"],
            self.denoiser(HOISTED),
            graphs,
            self.steps["exactness"],
        )
        self.result["checks"].update(found)
        # recorded, not required: either answer is a correct eager step; it says whether the reference's docstring
        # claim (the same bits as upcasting first) holds on CUDA
        self.result["reference_bits"] = parts.reference_bits(self.device)
        require(found)

    def edits(self, chosen: list[Rung]):
        for rung in chosen:
            run = self.loop(rung)
            self.result["end_to_end_s"][rung.name] = parts.end_to_end(
                self.vae,
                run,
                self.layouts["kontext"],
                self.data["kontext"],
                self.device,
                self.dtype,
                self.steps["edits"],
            )
            self.record.write()

    def fewer_calls(self, best: list[Rung]):
        """The solver's and the step cache's step times over the best rung's ops, hoisted and (if it has them)
        graphed: suite_parts.fewer_calls."""
        from kontext_rt.sampling.denoisers import Hoisted

        (rung,) = best
        denoisers = {"hoisted": Hoisted(self.model, self.ops_for(rung), self.dtype)}
        if rung.optimize.cuda_graphs:
            denoisers["graphs"] = self.denoiser(rung)
        n = self.steps
        self.result["fewer_calls"] = {"rung": rung.name} | parts.fewer_calls(
            self.model, self.ops_for(rung), self.dtype, denoisers, self.data["kontext"], self.device,
            n["steps_timed"], n["repeats"], n["warmup"],
        )  # fmt: skip
        self.record.write()

    def fewer_calls_estimate_s(self):
        n = self.steps  # 6 loops at most (2 solvers x 2 denoisers, 2 cache loops), one layout
        return 1.5 * 6 * (n["warmup"] + n["repeats"] * n["steps_timed"]) * self.step_s

    def edits_estimate_s(self, count=1):
        return 1.5 * count * (1 + sum(self.steps["edits"])) * self.step_s

    def profile(self, *profiled: Rung):
        """Each rung's ops by device time, over its backend's ops and its loop, hoisted or per-step but never
        graphed (a replay hides its kernels)."""
        from kontext_rt.sampling.denoisers import for_model

        for rung in profiled:
            ops = self.ops_for(rung)
            denoiser = for_model(self.model, ops, self.dtype, rung.optimize.hoist)
            run = parts.loop_fn(self.model, ops, self.dtype, denoiser)
            found = parts.profile_steps(run, *self.data["kontext"], self.device)
            self.result.setdefault("profile", {})[rung.name] = found
            self.record.write()

    def fp8_drift(self):
        fp8 = parts.trace(self.denoiser(HOISTED), self.data["kontext"], self.steps["drift"])
        self.result["fp8_drift"] = parts.drift(self.reference, fp8)
        self.denoisers.pop(HOISTED.name)

    def quantizer(self):
        rows, cols = (40, 96) if self.args.rehearse else (8704, 3072)
        found = parts.quantizer_check(self.device, rows, cols)
        self.result["checks"]["fp8_quantizer_kernel"] = found
        require({k: v for k, v in found.items() if isinstance(v, bool)})
