// NF4 (+ double quant) dequantization to fp32 / bf16 / fp16, bit-exact with quant/nf4.py's torch path.
//
// Format (bitsandbytes): the weight is flattened row-major; byte k holds element 2k in its HIGH nibble and
// element 2k+1 in its low nibble; element i belongs to quantization block i / blocksize (blocksize = 32..4096).
//   plain:        w[i] = NF4[code_i] * absmax[i / blocksize]                                (fp32, then cast)
//   double quant: absmax[j] = DYN[q_j] * nested_absmax[j / 256] + offset                     (two fp32 roundings)
//
// Work split. Dequantization is pure memory traffic: 0.5 byte read and 2 (bf16) or 4 (fp32) bytes written per
// weight, plus ~1/64 byte of absmax, so the kernel is designed around coalesced, vectorised memory access:
//   - one CHUNK = 4 packed bytes = 8 weights. A thread reads a chunk with ONE 32-bit load and writes its 8
//     outputs with ONE 16-byte store (bf16/fp16) or two (fp32). Neighbouring threads own neighbouring chunks, so
//     a warp reads 128 contiguous bytes and writes 512 (bf16) or 1024 (fp32) contiguous bytes per step.
//   - a chunk never straddles two quantization blocks (8 divides every blocksize), so each chunk needs ONE
//     absmax; with double quant that scale is rebuilt right here from its uint8 code, the nested absmax and the
//     offset: no separate pass, no fp32 absmax array in memory.
//   - each thread handles CHUNKS_PER_THREAD chunks spaced blockDim.x apart: all loads are issued before the
//     first store so several memory requests are in flight per thread (latency hiding), and the codebook copy
//     into shared memory is amortised over 256 x 4 chunks = 8192 weights per thread block.
//   - the 16 NF4 values and the 256-entry dynamic map live in shared memory: a lookup with a per-thread index
//     into a 16-entry table touches 16 distinct banks, so it never has bank conflicts.
// The last partial chunk (n not a multiple of 8) and buffers that are not 16-byte aligned take a scalar path.
// Multiplies and adds use __fmul_rn / __fadd_rn so nvcc cannot contract them into an FMA (one rounding instead
// of two), which would break bit-exactness with torch.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

constexpr int THREADS = 256;
constexpr int CHUNKS_PER_THREAD = 4;
constexpr int NESTED_BLOCKSIZE = 256;

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// The fp32 scale of quantization block j.
__device__ __forceinline__ float block_scale(const void* absmax, const float* nested, const float* offset,
                                             const float* dyn, long long j, bool double_quant) {
    if (!double_quant) return static_cast<const float*>(absmax)[j];
    uint8_t q = static_cast<const uint8_t*>(absmax)[j];
    return __fadd_rn(__fmul_rn(dyn[q], nested[j / NESTED_BLOCKSIZE]), *offset);
}

template <typename T>
__global__ void nf4_dequant_kernel(T* __restrict__ out, const uint8_t* __restrict__ packed,
                                   const void* __restrict__ absmax, const float* __restrict__ nested,
                                   const float* __restrict__ offset, const float* __restrict__ codebooks,
                                   long long n, int log2_blocksize, bool double_quant, bool vectorised) {
    __shared__ float nf4[16];
    __shared__ float dyn[256];
    for (int i = threadIdx.x; i < 16 + 256; i += blockDim.x) {
        if (i < 16) nf4[i] = codebooks[i]; else dyn[i - 16] = codebooks[i];
    }
    __syncthreads();

    const long long full_chunks = n / 8;                 // chunks whose 8 outputs are all inside the tensor
    const long long total_chunks = (n + 7) / 8;
    const long long first = (long long)blockIdx.x * THREADS * CHUNKS_PER_THREAD + threadIdx.x;

    // 1) issue every load of this thread first (4 bytes of codes per chunk)
    uint32_t codes[CHUNKS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < CHUNKS_PER_THREAD; k++) {
        long long c = first + (long long)k * THREADS;
        codes[k] = (vectorised && c < full_chunks) ? reinterpret_cast<const uint32_t*>(packed)[c] : 0u;
    }
    // 2) decode and store
#pragma unroll
    for (int k = 0; k < CHUNKS_PER_THREAD; k++) {
        long long c = first + (long long)k * THREADS;
        if (c >= total_chunks) break;
        float scale = block_scale(absmax, nested, offset, dyn, (c * 8) >> log2_blocksize, double_quant);
        if (vectorised && c < full_chunks) {
            // bytes b0..b3 in memory order (little endian); element 2m is the high nibble of byte m
            uint32_t w = codes[k];
            alignas(16) T vals[8];
#pragma unroll
            for (int m = 0; m < 4; m++) {
                uint32_t byte = (w >> (8 * m)) & 0xFF;
                vals[2 * m] = from_float<T>(__fmul_rn(nf4[byte >> 4], scale));
                vals[2 * m + 1] = from_float<T>(__fmul_rn(nf4[byte & 0xF], scale));
            }
            // 8 outputs = 16 bytes (bf16/fp16) or 32 bytes (fp32): one or two 128-bit stores
            uint4* dst = reinterpret_cast<uint4*>(out + c * 8);
            const uint4* src = reinterpret_cast<const uint4*>(vals);
#pragma unroll
            for (int v = 0; v < (int)(8 * sizeof(T) / 16); v++) dst[v] = src[v];
        } else {
            // scalar path: the partial last chunk, or unaligned buffers
            for (long long i = c * 8; i < c * 8 + 8 && i < n; i++) {
                uint8_t byte = packed[i >> 1];
                uint8_t code = (i & 1) ? (byte & 0xF) : (byte >> 4);
                out[i] = from_float<T>(__fmul_rn(nf4[code], scale));
            }
        }
    }
}

template <typename T>
static int launch(void* out, const void* packed, const void* absmax, const void* nested, const void* offset,
                  const void* codebooks, long long n, int blocksize, int double_quant, cudaStream_t stream) {
    if (n <= 0) return 0;
    int log2_bs = 0;
    while ((1 << log2_bs) < blocksize) log2_bs++;
    if ((1 << log2_bs) != blocksize || blocksize < 32) return (int)cudaErrorInvalidValue;
    bool vectorised = ((uintptr_t)out % 16 == 0) && ((uintptr_t)packed % 4 == 0);
    long long chunks = (n + 7) / 8;
    long long per_block = (long long)THREADS * CHUNKS_PER_THREAD;
    long long blocks = (chunks + per_block - 1) / per_block;
    nf4_dequant_kernel<T><<<(unsigned)blocks, THREADS, 0, stream>>>(
        static_cast<T*>(out), static_cast<const uint8_t*>(packed), absmax, static_cast<const float*>(nested),
        static_cast<const float*>(offset), static_cast<const float*>(codebooks), n, log2_bs, double_quant != 0,
        vectorised);
    return (int)cudaGetLastError();
}

// ctypes entry points: raw device pointers + the caller's stream. codebooks = 16 NF4 floats then 256 dynamic-map
// floats; absmax is fp32 (double_quant = 0) or uint8 codes (double_quant = 1); offset points to one fp32 on the
// device. Returns a cudaError_t (0 = launched).
extern "C" {
int nf4_dequant_fp32(void* out, const void* packed, const void* absmax, const void* nested, const void* offset,
                     const void* codebooks, long long n, int blocksize, int double_quant, cudaStream_t stream) {
    return launch<float>(out, packed, absmax, nested, offset, codebooks, n, blocksize, double_quant, stream);
}
int nf4_dequant_bf16(void* out, const void* packed, const void* absmax, const void* nested, const void* offset,
                     const void* codebooks, long long n, int blocksize, int double_quant, cudaStream_t stream) {
    return launch<__nv_bfloat16>(out, packed, absmax, nested, offset, codebooks, n, blocksize, double_quant, stream);
}
int nf4_dequant_fp16(void* out, const void* packed, const void* absmax, const void* nested, const void* offset,
                     const void* codebooks, long long n, int blocksize, int double_quant, cudaStream_t stream) {
    return launch<__half>(out, packed, absmax, nested, offset, codebooks, n, blocksize, double_quant, stream);
}
}
