"""Planning across several GPUs: per-device budgets (``Budget.devices``).

Candidates, all predicted with the one-device cost model of :mod:`vramkit.planner.search`:

- every one-device plan on each device alone (the usual search with that device's budget);
- for every ordered pair of devices (*main*, *aux*): the transformer (and ControlNet) on *main*,
  resident or block-streamed with as many blocks resident as *main* allows, and the text encoders
  on *aux* (resident, or T5 block-streamed there), with the VAE on either device.

The per-step work happens on *main* only, so the split costs no per-step copy: the prompt
embeddings cross once per prompt, the latents and the decoded image once per call (a few MB,
timed at the host link's bandwidth, an upper bound for a copy between GPUs). The fastest candidate
that fits every device's budget and the host RAM wins; the others are ``Plan.rejected``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import PlanInfeasibleError
from ..memory.budget import format_bytes
from ..memory.calibration import Calibration
from ..memory.estimator import text_encode_seconds, vae_decode_seconds
from ..plan import Plan, PlanStep, Predicted, Rejected, StagePrediction
from .search import (
    _PREFETCH,
    Candidate,
    SearchResult,
    _block_streaming,
    _Ctx,
    _disk_over,
    _families,
    _gb,
    _greedy_pinned,
    _lossless,
    _reversible,
    _run,
    _steps,
    _VaeOpt,
    originals_beside,
    pipeline_weights,
)
from .spec import Budget, PipelineSpec, Request

__all__ = ["search_devices"]

#: Fixed cost of one copy between devices (launch and synchronization), per crossing.
_CROSSING_S = 5e-4
_TEXT = ("text_encoder", "text_encoder_2")
#: Width of the prompt embeddings that cross from the text encoders' device (T5-XXL's hidden size).
_EMBED_WIDTH = 4096


@dataclass
class _Aux:
    """The text encoders (and perhaps the VAE) on the auxiliary device."""

    te: str  # resident, stream, none
    vae_here: bool
    vae: _VaeOpt | None
    padded: dict[str, int]  # stage -> padded peak on the aux device
    te_seconds: float
    ram: int
    pinned: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Option:
    """One whole candidate: a one-device plan or a split over two devices."""

    description: str
    devices: tuple[str, ...]
    stages: dict[str, StagePrediction]
    padded: dict[str, int]  # device -> padded peak (what must fit its budget)
    step_seconds: float
    call_seconds: float
    ram: int
    lossless: bool
    n_steps: int
    fits: bool
    why_not: str
    res: SearchResult
    cand: Candidate
    aux: _Aux | None = None
    aux_ctx: _Ctx | None = None

    def key(self) -> tuple[float, int, int, int, int]:
        # Equal speed: lossless first, then fewer devices, fewer steps, lower peak.
        return (
            self.call_seconds,
            int(not self.lossless),
            len(self.devices),
            self.n_steps,
            max(self.padded.values(), default=0),
        )


def _one_device(name: str, res: SearchResult, cand: Candidate) -> _Option:
    stages = {k: replace(st, devices={name: st.vram}) for k, st in cand.stages.items()}
    return _Option(
        description=f"one GPU ({name}): {cand.describe(res.ctx)}",
        devices=(name,),
        stages=stages,
        padded={name: cand.peak_vram},
        step_seconds=cand.step_seconds,
        call_seconds=cand.call_seconds,
        ram=cand.ram,
        lossless=cand.lossless,
        n_steps=cand.n_steps,
        fits=cand.fits,
        why_not=f"on {name}: {cand.why_not}" if cand.why_not else "",
        res=res,
        cand=cand,
    )


def _aux_options(actx: _Ctx, vae_here: bool, pin_left: int) -> list[_Aux]:
    """The text-encoder placements on the aux device, each with its fastest VAE option that fits."""
    cal = actx.cal
    tes = ["none"] if actx.clip is None and actx.t5 is None else ["resident"]
    if actx.can_stream(actx.t5, "loaded"):
        tes.append("stream")
    out = []
    for te in tes:
        # cuBLAS workspaces and runtime buffers on this device too, as on the main one.
        persist = cal.runtime_workspace_bytes + actx.w(actx.clip) + (actx.w(actx.vae) if vae_here else 0)
        info: dict[str, Any] = {}
        ram = pinned = 0
        te_seconds = 0.0
        if te == "resident":
            persist += actx.w(actx.t5)
            te_seconds = actx.te_passes * actx.te_compute()
        elif te == "stream":
            assert actx.t5 is not None
            g = actx.geo(actx.t5, "loaded", 0)
            pinned = _greedy_pinned(g.blocks, max(0, pin_left))
            persist += g.device
            ram += g.streamed + g.retained
            t5_c = text_encode_seconds(cal, actx.t5.sizes, None, actx.text_tokens)
            clip_c = text_encode_seconds(cal, None, actx.clip.sizes, actx.text_tokens) if actx.clip is not None else 0.0
            one = (
                actx.smooth(t5_c, pinned / actx.bw)
                + (g.streamed - pinned) / actx.pageable
                + cal.stream_overhead_s
                + clip_c
            )
            te_seconds = actx.te_passes * one
            info.update(t5_geo=g, t5_pinned=pinned, t5_one=one)
        padded = {
            "text_encoding": actx.pad(persist + (actx.t5_act() if te == "resident" or te == "stream" else 0)),
            "denoising_step": actx.pad(persist),
        }
        vae: _VaeOpt | None = None
        if vae_here:
            opts = actx.vae_options()  # fastest first
            scored = []
            for opt in opts:
                dec = actx.pad(persist + opt.dec_bytes)
                enc = actx.pad(persist + opt.enc_bytes) if actx.needs_encode() else 0
                scored.append((dec, enc, opt))
            room = actx.budget.vram
            pick = next((s for s in scored if s[0] <= room and s[1] <= room), None)
            if pick is None:
                pick = min(scored, key=lambda s: max(s[0], s[1]))
            padded["vae_decode"] = pick[0]
            if actx.needs_encode():
                padded["vae_encode"] = pick[1]
            vae = pick[2]
        else:
            padded["vae_decode"] = actx.pad(persist)
            if actx.needs_encode():
                padded["vae_encode"] = actx.pad(persist)
        out.append(_Aux(te, vae_here, vae, padded, te_seconds, ram, pinned, info))
    return out


def _split(
    mctx: _Ctx, res: SearchResult, cand: Candidate, actx: _Ctx, aux: _Aux, main: str, aux_name: str, total_ram: int
) -> _Option:
    req, cal = mctx.req, mctx.cal
    # The text encoders' host RAM counts too where the transformer's originals go (RAM or disk).
    cand = originals_beside(mctx, cand, aux.ram)
    bw = min(mctx.bw, actx.bw)
    # What crosses between the devices, and when.
    embed = actx.te_passes * (actx.text_tokens * _EMBED_WIDTH + 768) * 2 if aux.te != "none" else 0
    te_cross = embed / bw + (2 * actx.te_passes * _CROSSING_S if aux.te != "none" else 0.0)
    latents = req.batch_size * 16 * (req.height // 8) * (req.width // 8) * 4
    image = req.batch_size * 3 * req.height * req.width * 4
    stages: dict[str, StagePrediction] = {}
    padded_main: dict[str, int] = {"all": cand.peak_vram}  # the candidate's own fitted peak
    ram = cand.ram + aux.ram
    for name, st in cand.stages.items():
        alloc = st.vram
        if name == "vae_decode" and aux.vae_here:
            alloc += image  # the decoded image comes back to the execution device
        if alloc != st.vram:
            padded_main[name] = mctx.pad(alloc)
        aux_alloc = actx.unpad(aux.padded.get(name, aux.padded["denoising_step"]))
        seconds = st.seconds
        if name == "text_encoding":
            seconds = aux.te_seconds + te_cross
        elif name == "vae_decode" and aux.vae_here:
            assert aux.vae is not None
            seconds = vae_decode_seconds(cal, req.height, req.width, req.batch_size, tile=aux.vae.tile)
            seconds += (latents + image) / bw + 4 * _CROSSING_S
        elif name == "vae_encode" and aux.vae_here:
            assert aux.vae is not None
            dec = vae_decode_seconds(cal, req.height, req.width, req.batch_size, tile=aux.vae.tile)
            seconds = max(0.0, aux.vae.seconds - dec) + (image + latents) / bw + 4 * _CROSSING_S
        stages[name] = StagePrediction(
            vram=max(alloc, aux_alloc), ram=ram, seconds=seconds, devices={main: alloc, aux_name: aux_alloc}
        )
    peak_main = max(padded_main.values())
    peak_aux = max(aux.padded.values())
    step = cand.step_seconds
    call = stages["text_encoding"].seconds + req.num_inference_steps * step
    call += sum(s.seconds for k, s in stages.items() if k in ("vae_decode", "vae_encode", "load"))
    problems = []
    if peak_main > mctx.budget.vram:
        problems.append(
            f"needs {format_bytes(peak_main)} on {main} ({format_bytes(peak_main - mctx.budget.vram)} over its "
            f"{format_bytes(mctx.budget.vram)} budget)"
        )
    if peak_aux > actx.budget.vram:
        problems.append(
            f"needs {format_bytes(peak_aux)} on {aux_name} ({format_bytes(peak_aux - actx.budget.vram)} over its "
            f"{format_bytes(actx.budget.vram)} budget)"
        )
    if ram > total_ram:
        problems.append(f"needs {format_bytes(ram)} host RAM ({format_bytes(ram - total_ram)} over the budget)")
    if _disk_over(cand, mctx.budget):
        problems.append(
            f"needs {format_bytes(cand.info['disk_need'])} in the offload folder "
            f"({format_bytes(mctx.budget.disk_free or 0)} free on its disk)"
        )
    te_text = {
        "resident": "text encoders resident",
        "stream": "T5 block-streamed",
        "none": "no text encoders",
    }[aux.te]
    vae_where = aux_name if aux.vae_here else main
    tr = cand.describe(res.ctx).replace(", no text encoders", "")
    desc = f"two GPUs: on {main} {tr}; {te_text} on {aux_name}; VAE on {vae_where}"
    if aux.vae is not None and aux.vae.tile:
        desc += f" (tiles {aux.vae.tile}px)"
    lossless = cand.lossless and not (aux.vae is not None and aux.vae.tile is not None)
    n_steps = cand.n_steps + 1 + int(aux.te == "stream") + (aux.vae.n_steps if aux.vae is not None else 0)
    return _Option(
        description=desc,
        devices=(main, aux_name),
        stages=stages,
        padded={main: peak_main, aux_name: peak_aux},
        step_seconds=step,
        call_seconds=call,
        ram=ram,
        lossless=lossless,
        n_steps=n_steps,
        fits=not problems,
        why_not="does not fit: " + "; ".join(problems) if problems else "",
        res=res,
        cand=cand,
        aux=aux,
        aux_ctx=actx,
    )


def _split_options(
    spec: PipelineSpec,
    req: Request,
    budget: Budget,
    quality: str,
    cal: Calibration,
    streaming: bool,
    main: str,
    aux_name: str,
    main_results: dict[tuple[str, bool], SearchResult],
    parts: bool = True,
) -> list[_Option]:
    vrams = dict(budget.devices)
    has_vae = spec.get("vae") is not None
    best: dict[tuple[str, bool], _Option] = {}
    for vae_on_aux in (True, False) if has_vae else (False,):
        key = (main, vae_on_aux)
        if key not in main_results:
            keep = {n: c for n, c in spec.components.items() if n not in _TEXT and not (vae_on_aux and n == "vae")}
            mctx = _Ctx(
                replace(spec, components=keep),
                req,
                _one(budget, vrams[main]),
                quality,
                cal,
                streaming,
                parts,
                weights_ram=pipeline_weights(spec),
            )
            # The transformer's device holds it resident or streams it; offloading it whole every
            # call would throw away what the second device bought. 16-bit storage of an fp32
            # transformer would leave fp32 text encoders on the other device: not considered.
            fams = [f for f in _families(mctx) if f.place in ("resident", "stream") and f.fmt != "bf16"]
            main_results[key] = _run(mctx, fams)
        res = main_results[key]
        actx = _Ctx(spec, req, _one(budget, vrams[aux_name]), quality, cal, streaming, parts)
        for cand in res.by_family.values():
            for aux in _aux_options(actx, vae_on_aux, budget.pinned - cand.pinned):
                opt = _split(res.ctx, res, cand, actx, aux, main, aux_name, budget.ram)
                k = (aux.te, vae_on_aux)
                cur = best.get(k)
                if (
                    cur is None
                    or (opt.fits, cur.fits) == (True, False)
                    or (opt.fits == cur.fits and opt.key() < cur.key())
                ):
                    best[k] = opt
    return list(best.values())


def _one(budget: Budget, vram: int) -> Budget:
    return replace(budget, vram=int(vram), devices=())


def _why_lost(o: _Option, best: _Option, quality: str, min_gain: float) -> str:
    if not o.fits:
        return o.why_not
    if quality == "lossless" and not o.lossless:
        return "changes numerics (quality='lossless')"
    slower = o.call_seconds - best.call_seconds
    if slower < 0 and len(o.devices) > len(best.devices):
        return (
            f"faster by {-slower:.2f} s per call, less than the {min_gain:.0%} a split across devices must gain "
            "over one device (cross-device transfers are not in the model)"
        )
    if slower > 0:
        return f"slower by {slower:.2f} s per call ({o.step_seconds:.3f} vs {best.step_seconds:.3f} s/step)"
    if not o.lossless and best.lossless:
        return "as fast, but changes numerics"
    if len(o.devices) > len(best.devices):
        return "as fast, on more devices"
    return "as fast; the chosen plan came first (or peaks lower)"


def _placed_on(step: PlanStep, device: str, why: str) -> PlanStep:
    """``step`` with its placement bound to ``device`` (Resident and BlockStreaming take a device)."""
    s = step.strategy
    if s.name not in ("Resident", "BlockStreaming"):
        return step
    return dataclasses.replace(
        step, strategy=dataclasses.replace(s, device=device), reason=f"on {device}{why}: {step.reason}"
    )


def _with_lossless_alt(res: SearchResult, cand: Candidate, cal: Calibration, streaming: bool) -> None:
    if not cand.lossless and res.best_lossless is None:
        ctx = res.ctx
        res.best_lossless = _run(
            _Ctx(ctx.spec, ctx.req, ctx.budget, "lossless", cal, streaming, weights_ram=ctx.weights_ram)
        ).best


def _aux_steps(actx: _Ctx, aux: _Aux, aux_name: str, main: str) -> list[PlanStep]:
    from ..strategies.configs import Resident, VaeSlicing, VaeTiling

    steps: list[tuple[Any, str | None, str]] = []
    w_te = actx.w(actx.clip) + actx.w(actx.t5)
    resident: list[str] = [n for n in ("text_encoder",) if actx.spec.get(n) is not None]
    te_s = f"{aux.te_seconds:.2f} s per prompt"
    if aux.te == "resident":
        resident += [n for n in ("text_encoder_2",) if actx.spec.get(n) is not None]
    if aux.te == "stream":
        BlockStreaming = _block_streaming()
        assert BlockStreaming is not None
        g = aux.info["t5_geo"]
        pin = aux.info["t5_pinned"]
        steps.append(
            (
                BlockStreaming(
                    resident=0,
                    prefetch=_PREFETCH,
                    components=("text_encoder_2",),
                    device=aux_name,
                    pinned_limit=pin if pin < g.streamed else None,
                ),
                "text_encoder_2",
                f"T5 ({_gb(actx.w(actx.t5))}) does not fit beside the rest on {aux_name}: its {g.n_streamed} blocks "
                f"stream there once per prompt ({te_s}), keeping {_gb(g.device)} on {aux_name}; {main} keeps all "
                "its memory for the transformer.",
            )
        )
    if aux.vae_here and actx.vae is not None:
        resident.append("vae")
    if resident:
        peak = max(aux.padded.values())
        steps.append(
            (
                Resident(components=tuple(resident), device=aux_name),
                None,
                f"{', '.join(f'{n} {_gb(actx.w(actx.spec.get(n)))}' for n in resident)} whole on {aux_name}, so "
                f"{main} keeps its memory for the transformer; "
                + (f"text encoding {te_s} ({_gb(w_te)} of encoders); " if aux.te != "none" else "")
                + f"{aux_name} peaks at {format_bytes(actx.unpad(peak))} of its {format_bytes(actx.budget.vram)} "
                f"budget; the prompt embeddings, latents and decoded image cross between the devices (a few MB per "
                "call, no copy per step).",
            )
        )
    if aux.vae is not None and aux.vae.tile is not None:
        steps.append(
            (
                VaeTiling(tile=aux.vae.tile),
                "vae",
                f"a plain decode does not fit on {aux_name} beside the text encoders: {aux.vae.tile}px tiles "
                "(pixels near tile seams may differ slightly).",
            )
        )
    if aux.vae is not None and aux.vae.slicing:
        steps.append((VaeSlicing(), "vae", f"one image at a time keeps the decode within {aux_name}'s budget."))
    return [
        PlanStep(strategy=s, component=c, reason=r, lossless=_lossless(s), reversible=_reversible(s))
        for s, c, r in steps
    ]


def search_devices(
    spec: PipelineSpec,
    req: Request,
    budget: Budget,
    quality: str,
    cal: Calibration,
    streaming: bool,
    record: dict[str, Any],
    notes: list[str],
    parts: bool = True,
) -> Plan:
    """The fastest plan over ``budget.devices`` (see the module docstring); ``parts``: whether
    streaming by parts may be planned."""
    options: list[_Option] = []
    one_best: dict[str, _Option] = {}
    evaluated = 0
    minimum: int | None = None
    for name, vram in budget.devices:
        res = _run(_Ctx(spec, req, _one(budget, vram), quality, cal, streaming, parts))
        evaluated += res.evaluated
        if res.minimum_vram is not None and (minimum is None or res.minimum_vram < minimum):
            minimum = res.minimum_vram
        for cand in res.by_family.values():
            opt = _one_device(name, res, cand)
            options.append(opt)
            if opt.fits and (name not in one_best or opt.key() < one_best[name].key()):
                one_best[name] = opt
    main_results: dict[tuple[str, bool], SearchResult] = {}
    names = [n for n, _ in budget.devices]
    for main in names:
        for aux_name in names:
            if aux_name != main:
                options += _split_options(
                    spec, req, budget, quality, cal, streaming, main, aux_name, main_results, parts
                )
    evaluated += sum(r.evaluated for r in main_results.values())
    fitting = [o for o in options if o.fits]
    budgets = ", ".join(f"{n} {format_bytes(v)}" for n, v in budget.devices)
    if not fitting:
        what = f"{spec.name} at {req.width}x{req.height}, batch {req.batch_size} (quality={quality!r})"
        msg = f"no plan for {what} fits the per-device budgets ({budgets}) and {format_bytes(budget.ram)} RAM"
        if minimum is not None:
            msg += f"; the smallest plan needs {format_bytes(minimum)} on one device"
        raise PlanInfeasibleError(msg + ".", minimum_vram=minimum, minimum_ram=None)
    best = min(fitting, key=_Option.key)
    alone = min(one_best.values(), key=_Option.key, default=None)
    declined: _Option | None = None
    if (
        len(best.devices) > 1
        and alone is not None
        and alone.lossless >= best.lossless
        and best.call_seconds > alone.call_seconds * (1.0 - cal.multi_device_min_gain)
    ):
        # Within the model's error a split only adds cross-device hops: keep one device.
        declined, best = best, alone
    _with_lossless_alt(best.res, best.cand, cal, streaming)
    if len(best.devices) == 1:
        device = best.devices[0]
        steps = [_placed_on(s, device, "") for s in _steps(best.res, best.cand)]
        placement = f"placement: everything on {device}: {best.cand.describe(best.res.ctx)}"
    else:
        main, aux_name = best.devices
        assert best.aux is not None and best.aux_ctx is not None
        why = " (the transformer's device, where every denoising step runs)"
        steps = [_placed_on(s, main, why) for s in _steps(best.res, best.cand)]
        steps += _aux_steps(best.aux_ctx, best.aux, aux_name, main)
        steps.sort(key=lambda st: st.strategy.order)
        placement = f"placement: {best.description}"
    plan_notes = list(notes) + [f"planned across {len(names)} devices ({budgets})", placement]
    if declined is not None:
        plan_notes.append(
            f"one device: the best split ({declined.description}) is predicted at {declined.call_seconds:.1f} s "
            f"per call against {best.call_seconds:.1f} s, less than {cal.multi_device_min_gain:.0%} faster, "
            "not worth its cross-device transfers"
        )
    elif alone is not None and alone is not best:
        plan_notes.append(
            f"the best one-device plan ({alone.devices[0]}) takes {alone.step_seconds:.3f} s/step, "
            f"{alone.call_seconds:.1f} s per call; this plan {best.step_seconds:.3f} s/step, {best.call_seconds:.1f} s"
        )
    elif alone is None:
        plan_notes.append("no one-device plan fits any single device's budget")
    plan_notes.append(
        "predicted peaks are allocated memory per device (torch.cuda.max_memory_allocated); the plan was fitted "
        f"with {cal.allocator_reserve_fraction:.0%} + {format_bytes(cal.allocator_reserve_bytes)} more per stage "
        "for the allocator"
    )
    plan_notes.append(f"{evaluated} candidates evaluated; constants: {cal.source}")
    rejected = sorted(
        (o for o in options if o is not best),
        key=lambda o: (int(not o.fits), o.call_seconds if o.fits else 0.0),
    )
    stages = best.stages
    return Plan(
        steps=steps,
        predicted=Predicted(
            peak_vram=max(st.vram for st in stages.values()),
            peak_ram=best.ram,
            seconds_per_step=best.step_seconds,
            seconds_per_image=best.call_seconds / req.batch_size,
            num_inference_steps=req.num_inference_steps,
            stages=stages,
        ),
        rejected=[
            Rejected(
                o.description,
                _why_lost(o, best, quality, cal.multi_device_min_gain),
                max(o.padded.values()),
                o.step_seconds,
            )
            for o in rejected
        ],
        request=record,
        notes=plan_notes,
    )
