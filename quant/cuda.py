"""Build, load and call our CUDA NF4 dequantization kernel (quant/csrc/nf4_dequant.cu) without torch's C++ API.

The .cu file exports plain `extern "C"` launchers taking raw device pointers and a cudaStream_t, so it is
compiled with nothing but `nvcc -shared -Xcompiler -fPIC` (the CPU torch wheel has no CUDA headers and we need
none) and called through ctypes on torch.cuda.current_stream(). The library is built on first use into
~/.cache/nanotune/nf4/<source hash>-<sm_XY>/, so an edited kernel or another GPU gets a fresh build. Without a
GPU or without nvcc, dequantize() falls back to the torch path (quant/nf4.py) with a one-time notice.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .nf4 import DYNAMIC_CODE, NF4_CODE, NF4State, check_state, dequantize_nf4

SOURCE = Path(__file__).parent / "csrc" / "nf4_dequant.cu"
CACHE = Path(os.environ.get("NANOTUNE_CACHE", Path.home() / ".cache" / "nanotune")) / "nf4"
LAUNCHERS = {torch.float32: "nf4_dequant_fp32", torch.bfloat16: "nf4_dequant_bf16",
             torch.float16: "nf4_dequant_fp16"}
_lib = None        # the loaded ctypes library, or False after a failed attempt
_noticed = False


def build(arch: str, out_dir: Path, nvcc: str = "nvcc") -> Path:
    """Compile the kernel for one GPU architecture (e.g. "sm_90") into out_dir/libnf4.so; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    so = out_dir / "libnf4.so"
    tmp = out_dir / f"libnf4.{os.getpid()}.so"  # build beside, rename: a concurrent loader never sees half a file
    cmd = [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", f"-arch={arch}", "-o", str(tmp), str(SOURCE)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{SOURCE}: nvcc failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    os.replace(tmp, so)
    return so


def _load():
    global _lib
    if _lib is None:
        _lib = False
        nvcc = shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc")
        if torch.cuda.is_available() and nvcc:
            major, minor = torch.cuda.get_device_capability()
            arch = f"sm_{major}{minor}"
            key = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
            so = CACHE / f"{key}-{arch}" / "libnf4.so"
            if not so.exists():
                build(arch, so.parent, nvcc)
            lib = ctypes.CDLL(str(so))
            for name in LAUNCHERS.values():
                fn = getattr(lib, name)
                # out, packed, absmax, nested_absmax, nested_offset, codebooks, n, blocksize, double_quant, stream
                fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                                       ctypes.c_void_p]
                fn.restype = ctypes.c_int
            _lib = lib
    return _lib


def available() -> bool:
    """True when the kernel is built and loadable on this machine."""
    return bool(_load())


def _notice(why: str):
    global _noticed
    if not _noticed:
        print(f"nanotune: NF4 CUDA kernel unavailable ({why}); using the torch dequantize path", file=sys.stderr)
        _noticed = True


_codebooks = {}   # device -> the 16 NF4 + 256 dynamic-map floats
_offsets = {}     # (device, nested offset) -> that fp32 scalar on the device: uploaded once, not per call


def kernel_dequantize(packed: torch.Tensor, state: NF4State, dtype: torch.dtype,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize CUDA tensors with our kernel into `out` (allocated if None), on the current stream. Nothing is
    copied host -> device per call (the codebooks and the double-quant offset are cached per device), so a call
    is one kernel launch; a tensor on another device, non-contiguous or of the wrong dtype is a one-line error."""
    check_state(packed, state)
    dev = packed.device
    tensors = {"packed": packed, "absmax": state.absmax, "out": out}
    if state.double_quant:
        tensors["nested_absmax"] = state.nested_absmax
    for name, t in tensors.items():
        if t is not None and (t.device != dev or not t.is_contiguous()):
            raise ValueError(f"kernel_dequantize: {name} must be a contiguous tensor on {dev} (got "
                             f"{'non-contiguous' if t.device == dev else t.device})")
    if dtype not in LAUNCHERS or (out is not None and (out.dtype != dtype or out.numel() != state.numel)):
        raise ValueError(f"kernel_dequantize: dtype {dtype} / out {None if out is None else (out.dtype, out.numel())}"
                         f": expected one of {', '.join(map(str, LAUNCHERS))} and {state.numel} elements")
    lib = _load()
    if not lib:
        raise RuntimeError("NF4 CUDA kernel unavailable (needs a CUDA GPU and nvcc)")
    if dev not in _codebooks:  # 16 NF4 floats then the 256 dynamic-map floats, one small upload per device
        _codebooks[dev] = torch.cat([NF4_CODE, DYNAMIC_CODE]).to(dev)
    n = state.numel
    if out is None:
        out = torch.empty(state.shape, dtype=dtype, device=dev)
    dq = state.double_quant
    # the offset is read by the kernel from device memory: no host sync for a 0-d CUDA tensor
    nested = state.nested_absmax if dq else state.absmax  # any valid pointer when unused
    if dq and isinstance(state.nested_offset, torch.Tensor):  # already a tensor: no sync moving it (on `dev`)
        offset = state.nested_offset.to(device=dev, dtype=torch.float32)
    else:
        key = (dev, float(state.nested_offset) if dq else 0.0)
        if key not in _offsets:
            _offsets[key] = torch.tensor(key[1], dtype=torch.float32, device=dev)
        offset = _offsets[key]
    with torch.cuda.device(dev):  # the launch goes to the current device: make it the tensors' one
        rc = getattr(lib, LAUNCHERS[dtype])(
            out.data_ptr(), packed.data_ptr(), state.absmax.data_ptr(), nested.data_ptr(), offset.data_ptr(),
            _codebooks[dev].data_ptr(), n, state.blocksize, int(dq), torch.cuda.current_stream(dev).cuda_stream)
    if rc != 0:
        raise RuntimeError(f"NF4 CUDA kernel launch failed (cudaError {rc})")
    return out


def dequantize(packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    """The kernel for CUDA tensors when available, else the torch path (quant/nf4.py)."""
    if packed.is_cuda:
        try:
            if available():
                return kernel_dequantize(packed, state, dtype)
            _notice("no nvcc found")
        except (OSError, RuntimeError) as e:
            _notice(str(e).splitlines()[0])
    return dequantize_nf4(packed, state, dtype)
