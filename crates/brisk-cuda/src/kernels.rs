//! brisk's own CUDA kernels, as CUDA C compiled at run time by NVRTC (no toolkit at build
//! time), each compiled once per process and architecture: the fused SGD update over one
//! flat parameter buffer, softmax cross-entropy with label smoothing (loss, gradient,
//! top-1/top-5), global average pooling, the squeeze-and-excitation gate and batch-norm
//! over NHWC activations (its launchers and host twins are in batchnorm.rs). Each is
//! compiled for the device's exact architecture to PTX and to CUBIN; devices load the
//! CUBIN, which the driver takes whatever CUDA version it JIT-compiles PTX up to (a PTX
//! newer than the driver fails to load).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use std::ffi::{c_char, CStr, CString};

use cudarc::nvrtc::{result, sys, Ptx};

use crate::error::{Error, Result};

/// One kernel: its entry point's name and its CUDA C source.
#[derive(Debug)]
pub struct Kernel {
    pub name: &'static str,
    pub source: &'static str,
}

/// PyTorch's SGD (dampening 0) over a flat buffer, one thread per value: d = g·scale
/// (+ weight decay · w where `decays[i]`), m = momentum·m + d (m starts at zero, so the
/// first step's m is d, as PyTorch's), step = d + momentum·m (Nesterov) or m, w −= lr·step.
pub const SGD_UPDATE: Kernel = Kernel {
    name: "sgd_update",
    source: r#"
extern "C" __global__ void sgd_update(float* __restrict__ w, const float* __restrict__ g,
                                      float* __restrict__ m, const unsigned char* __restrict__ decays,
                                      long long n, float lr, float momentum, float weight_decay,
                                      int nesterov, float grad_scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float d = g[i] * grad_scale;
        if (decays[i]) d += weight_decay * w[i];
        float buf = momentum * m[i] + d;
        m[i] = buf;
        w[i] -= lr * (nesterov ? d + momentum * buf : buf);
    }
}
"#,
};

/// Softmax cross-entropy with label smoothing ε, one thread per sample: the loss
/// −Σ t·log p with t = 1 − ε + ε/C on the label and ε/C elsewhere, the gradient
/// (p − t)·`inv_batch` of the logits, and whether the label is in the top 1 / top 5 (ties
/// count for the label).
pub const SOFTMAX_XENT: Kernel = Kernel {
    name: "softmax_xent",
    source: r#"
extern "C" __global__ void softmax_xent(const float* __restrict__ logits, const int* __restrict__ labels,
                                        int n, int classes, float smoothing, float inv_batch,
                                        float* __restrict__ loss, float* __restrict__ dlogits,
                                        int* __restrict__ top1, int* __restrict__ top5) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= n) return;
    const float* z = logits + (long long)s * classes;
    float* dz = dlogits + (long long)s * classes;
    int y = labels[s];
    float mx = __int_as_float(0xff800000);  // -infinity (NVRTC has no math headers)
    for (int c = 0; c < classes; ++c) mx = fmaxf(mx, z[c]);
    float sum = 0.0f;
    for (int c = 0; c < classes; ++c) sum += expf(z[c] - mx);
    float lse = mx + logf(sum);
    float off = smoothing / classes, on = 1.0f - smoothing + off;
    float l = 0.0f;
    int above = 0;
    for (int c = 0; c < classes; ++c) {
        float t = (c == y) ? on : off;
        l -= t * (z[c] - lse);
        dz[c] = (expf(z[c] - lse) - t) * inv_batch;
        if (z[c] > z[y]) above++;
    }
    loss[s] = l;
    top1[s] = above < 1;
    top5[s] = above < 5;
}
"#,
};

/// Global average pooling of `nc` planes of `hw` values: forward one thread per plane,
/// backward one thread per value (dx = dy / hw).
pub const GLOBAL_AVG_POOL: Kernel = Kernel {
    name: "global_avg_pool_fwd",
    source: r#"
extern "C" __global__ void global_avg_pool_fwd(const float* __restrict__ x, float* __restrict__ y,
                                               int nc, int hw) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nc) return;
    const float* p = x + (long long)i * hw;
    float s = 0.0f;
    for (int k = 0; k < hw; ++k) s += p[k];
    y[i] = s / hw;
}

extern "C" __global__ void global_avg_pool_bwd(const float* __restrict__ dy, float* __restrict__ dx,
                                               int nc, int hw) {
    long long total = (long long)nc * hw;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        dx[i] = dy[i / hw] / hw;
    }
}
"#,
};

/// The squeeze-and-excitation gate y = x · s, `s` one value per plane: forward one thread
/// per value; backward one thread per plane (ds = Σ dy·x over the plane, dx = dy·s).
pub const SE_GATE: Kernel = Kernel {
    name: "se_gate_fwd",
    source: r#"
extern "C" __global__ void se_gate_fwd(const float* __restrict__ x, const float* __restrict__ s,
                                       float* __restrict__ y, int nc, int hw) {
    long long total = (long long)nc * hw;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = x[i] * s[i / hw];
    }
}

extern "C" __global__ void se_gate_bwd(const float* __restrict__ x, const float* __restrict__ s,
                                       const float* __restrict__ dy, float* __restrict__ dx,
                                       float* __restrict__ ds, int nc, int hw) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nc) return;
    long long base = (long long)i * hw;
    float acc = 0.0f, scale = s[i];
    for (int k = 0; k < hw; ++k) {
        acc += dy[base + k] * x[base + k];
        dx[base + k] = dy[base + k] * scale;
    }
    ds[i] = acc;
}
"#,
};

/// Batch-norm over NHWC activations `[m, c]` (launchers and host twins: batchnorm.rs):
/// partial sums over chunks of rows, one thread per (chunk, channel), reduced in double;
/// the normalisation with residual add and ReLU fused; the input gradient in place.
pub const BATCH_NORM: Kernel = Kernel {
    name: "bn_sum_partials",
    source: r#"
// This thread's cell i = k·c + ch of the [chunks, c] table: chunk k, channel ch, rows
// [begin, end). False for the threads past the table.
__device__ bool chunk_of(long long m, int c, int rows, long long* i, long long* k, int* ch,
                         long long* begin, long long* end) {
    long long chunks = (m + rows - 1) / rows;
    *i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (*i >= chunks * c) return false;
    *k = *i / c;
    *ch = (int)(*i % c);
    *begin = *k * rows;
    *end = (*k + 1) * rows < m ? (*k + 1) * rows : m;
    return true;
}

extern "C" __global__ void bn_sum_partials(const float* __restrict__ x, long long m, int c, int rows,
                                           float* __restrict__ part) {
    long long i, k, begin, end;
    int ch;
    if (!chunk_of(m, c, rows, &i, &k, &ch, &begin, &end)) return;
    float s = 0.0f;
    for (long long r = begin; r < end; ++r) s += x[r * c + ch];
    part[i] = s;
}

extern "C" __global__ void bn_sq_partials(const float* __restrict__ x, const float* __restrict__ stats,
                                          long long m, int c, int rows, float* __restrict__ part) {
    long long i, k, begin, end;
    int ch;
    if (!chunk_of(m, c, rows, &i, &k, &ch, &begin, &end)) return;
    float mean = stats[ch], s = 0.0f;
    for (long long r = begin; r < end; ++r) {
        float d = x[r * c + ch] - mean;
        s += d * d;
    }
    part[i] = s;
}

extern "C" __global__ void bn_grad_partials(const float* __restrict__ x, const float* __restrict__ dz,
                                            const float* __restrict__ stats, long long m, int c,
                                            int rows, double eps, float* __restrict__ part) {
    long long i, k, begin, end;
    int ch;
    if (!chunk_of(m, c, rows, &i, &k, &ch, &begin, &end)) return;
    float mean = stats[ch];
    float inv_std = (float)(1.0 / sqrt((double)stats[c + ch] + eps));
    float a = 0.0f, b = 0.0f;
    for (long long r = begin; r < end; ++r) {
        float g = dz[r * c + ch];
        a += g * (x[r * c + ch] - mean);
        b += g;
    }
    part[k * 2 * c + ch] = a * inv_std;
    part[k * 2 * c + c + ch] = b;
}

extern "C" __global__ void bn_reduce(const float* __restrict__ part, long long chunks, int width,
                                     double scale, float* __restrict__ out, int offset) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= width) return;
    double s = 0.0;
    for (long long k = 0; k < chunks; ++k) s += (double)part[k * width + j];
    out[offset + j] = (float)(s * scale);
}

extern "C" __global__ void bn_normalize_nhwc(const float* __restrict__ x, const float* __restrict__ stats,
                                             const float* __restrict__ affine,
                                             const float* __restrict__ residual, int has_residual,
                                             float* __restrict__ y, long long total, int c,
                                             double eps, int relu) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)(i % c);
        float inv_std = (float)(1.0 / sqrt((double)stats[c + ch] + eps));
        float scale = affine[ch] * inv_std;
        float shift = affine[c + ch] - stats[ch] * scale;
        float v = x[i] * scale + shift;
        if (has_residual) v += residual[i];
        y[i] = relu ? fmaxf(v, 0.0f) : v;
    }
}

extern "C" __global__ void bn_input_grad_nhwc(const float* __restrict__ x, float* __restrict__ g,
                                              const float* __restrict__ stats,
                                              const float* __restrict__ affine,
                                              const float* __restrict__ sums, long long total,
                                              int c, float count, double eps) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)(i % c);
        float mean = stats[ch];
        float inv_std = (float)(1.0 / sqrt((double)stats[c + ch] + eps));
        float a = affine[ch] * inv_std;
        float mean_dz = sums[c + ch] / count, mean_dzx = sums[ch] / count;
        float xh = (x[i] - mean) * inv_std;
        g[i] = a * (g[i] - mean_dz - xh * mean_dzx);
    }
}
"#,
};

/// Element-wise passes over a flat buffer, grid-stride: `ew_unary` in place (0 ReLU
/// `max(0, v)`, 1 sigmoid, 2 rounding to the nearest bf16, 3 to the nearest f16 — by the
/// `cvt.rn` instructions, ties to even, kept as f32) and `ew_binary` `dst op= src` (0 add,
/// 1 add then ReLU — a block's residual sum —, 2 ReLU's backward: `dst` zeroed where
/// `src`, the ReLU's output, is not positive). Launchers and host twins: elementwise.rs.
pub const ELEMENTWISE: Kernel = Kernel {
    name: "ew_unary",
    source: r#"
extern "C" __global__ void ew_unary(float* __restrict__ x, long long n, int op) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = x[i];
        if (op == 0) {
            v = fmaxf(v, 0.0f);
        } else if (op == 1) {
            v = 1.0f / (1.0f + expf(-v));
        } else if (op == 2) {
            unsigned short b;
            asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(v));
            v = __uint_as_float(((unsigned int)b) << 16);
        } else {
            unsigned short h;
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
            asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
        }
        x[i] = v;
    }
}

extern "C" __global__ void ew_binary(float* __restrict__ dst, const float* __restrict__ src,
                                     long long n, int op) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float d = dst[i], s = src[i];
        if (op == 0) {
            d = d + s;
        } else if (op == 1) {
            d = fmaxf(d + s, 0.0f);
        } else {
            d = s > 0.0f ? d : 0.0f;
        }
        dst[i] = d;
    }
}
"#,
};

/// Max-pooling over NCHW planes with -inf padding (the ImageNet stem's 3x3/2, padding 1),
/// the gradient going to each window's first maximum (NaN wins, as in PyTorch), as
/// brisk-ops' `MaxPool`: forward one thread per output; backward one thread per input
/// value, gathering the windows that cover it in window order — the CPU's order of
/// addition, with no atomics. Launchers and the backward's host twin: pool.rs.
pub const MAX_POOL: Kernel = Kernel {
    name: "max_pool_fwd",
    source: r#"
__device__ int pool_argmax(const float* plane, int h, int w, int oh, int ow, int k, int s, int p) {
    int r0 = max(oh * s - p, 0), r1 = min(oh * s + k - p, h);
    int c0 = max(ow * s - p, 0), c1 = min(ow * s + k - p, w);
    float best = -__int_as_float(0x7f800000);
    int at = r0 * w + c0;
    for (int ih = r0; ih < r1; ++ih) {
        for (int iw = c0; iw < c1; ++iw) {
            float v = plane[ih * w + iw];
            if (v > best || (v != v && best == best)) {
                best = v;
                at = ih * w + iw;
            }
        }
    }
    return at;
}

extern "C" __global__ void max_pool_fwd(const float* __restrict__ x, float* __restrict__ y,
                                        long long planes, int h, int w, int ho, int wo,
                                        int k, int s, int p) {
    long long total = planes * ho * wo;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long pl = i / (ho * wo);
        int r = (int)(i % (ho * wo));
        const float* plane = x + pl * h * w;
        y[i] = plane[pool_argmax(plane, h, w, r / wo, r % wo, k, s, p)];
    }
}

extern "C" __global__ void max_pool_bwd(const float* __restrict__ x, const float* __restrict__ dy,
                                        float* __restrict__ dx, long long planes, int h, int w,
                                        int ho, int wo, int k, int s, int p) {
    long long total = planes * h * w;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long pl = i / (h * w);
        int at = (int)(i % (h * w));
        int ih = at / w, iw = at % w;
        const float* plane = x + pl * h * w;
        const float* g = dy + pl * ho * wo;
        // Windows oh with oh*s - p <= ih < oh*s - p + k.
        int oh0 = max((ih + p - k + s) / s, 0), oh1 = min((ih + p) / s, ho - 1);
        int ow0 = max((iw + p - k + s) / s, 0), ow1 = min((iw + p) / s, wo - 1);
        float acc = 0.0f;
        for (int oh = oh0; oh <= oh1; ++oh) {
            for (int ow = ow0; ow <= ow1; ++ow) {
                if (pool_argmax(plane, h, w, oh, ow, k, s, p) == at) acc += g[oh * wo + ow];
            }
        }
        dx[i] = acc;
    }
}
"#,
};

/// Every kernel source brisk compiles.
pub const KERNELS: [&Kernel; 7] = [
    &SGD_UPDATE,
    &SOFTMAX_XENT,
    &GLOBAL_AVG_POOL,
    &SE_GATE,
    &BATCH_NORM,
    &ELEMENTWISE,
    &MAX_POOL,
];

/// Whether NVRTC (libnvrtc, from the CUDA toolkit or PyPI's `nvidia-cuda-nvrtc` wheel on
/// `LD_LIBRARY_PATH`) loads here.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library and reports whether it could.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// A kernel compiled for one architecture.
#[derive(Debug)]
pub struct Compiled {
    /// The PTX (readable; what a driver would JIT-compile).
    pub ptx: String,
    /// The architecture's machine code (an ELF image), what devices load.
    pub cubin: Vec<u8>,
}

impl Compiled {
    /// The image a device loads: the CUBIN.
    pub fn image(&self) -> Ptx {
        Ptx::from_binary(self.cubin.clone())
    }
}

type Cache = Mutex<HashMap<(&'static str, &'static str), Arc<Compiled>>>;

/// `kernel` compiled for `arch` ("sm_90" for Hopper), once per process.
pub fn compile(kernel: &'static Kernel, arch: &'static str) -> Result<Arc<Compiled>> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (kernel.name, arch);
    if let Some(done) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(done);
    }
    if !nvrtc_present() {
        return Err(Error::Missing {
            library: "libnvrtc (CUDA's run-time compiler)",
            hint: "install the CUDA toolkit, or `pip install nvidia-cuda-nvrtc` and put its lib folder on LD_LIBRARY_PATH",
        });
    }
    let done = Arc::new(nvrtc(kernel, arch)?);
    if let Ok(mut c) = cache.lock() {
        c.insert(key, done.clone());
    }
    Ok(done)
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by `create_program`, destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// Compiles `kernel` for `arch` with NVRTC: PTX and CUBIN, or its log on failure.
fn nvrtc(kernel: &'static Kernel, arch: &'static str) -> Result<Compiled> {
    let fail = |what: &str, detail: String| Error::Compile {
        kernel: kernel.name,
        arch,
        log: format!("{what}: {detail}"),
    };
    let src = CString::new(kernel.source).map_err(|e| fail("source", e.to_string()))?;
    let prog = Program(
        result::create_program(&src, None).map_err(|e| fail("creating the program", format!("{e:?}")))?,
    );
    let options = [format!("--gpu-architecture={arch}")];
    // SAFETY (every call on `prog`): the program is alive until `prog` drops, after them.
    if let Err(e) = unsafe { result::compile_program(prog.0, &options) } {
        let log = unsafe { result::get_program_log(prog.0) }.map_or_else(|_| format!("{e:?}"), c_text);
        return Err(fail("NVRTC", log));
    }
    let ptx = unsafe { result::get_ptx(prog.0) }.map_err(|e| fail("reading the PTX", format!("{e:?}")))?;
    let mut size = 0usize;
    // SAFETY: as above; `size` is a valid place for the count.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(|e| fail("sizing the CUBIN", format!("{e:?}")))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: as above; `cubin` holds the `size` bytes NVRTC writes.
    unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(|e| fail("reading the CUBIN", format!("{e:?}")))?;
    Ok(Compiled {
        ptx: c_text(ptx),
        cubin,
    })
}

/// NVRTC's NUL-terminated text as a string.
fn c_text(chars: Vec<c_char>) -> String {
    let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entry points a source defines.
    fn entries(source: &str) -> Vec<&str> {
        source
            .split("__global__ void ")
            .skip(1)
            .filter_map(|rest| rest.split('(').next())
            .collect()
    }

    #[test]
    fn every_kernel_is_named_after_its_first_entry_point() {
        for k in KERNELS {
            assert_eq!(entries(k.source).first(), Some(&k.name), "{}", k.name);
        }
        let names: Vec<&str> = KERNELS.iter().flat_map(|k| entries(k.source)).collect();
        assert_eq!(names.len(), 16, "{names:?}");
    }

    #[test]
    fn every_kernel_compiles_for_ampere_and_hopper() -> std::result::Result<(), Box<dyn std::error::Error>> {
        if !nvrtc_present() {
            brisk_hosts::skipped(
                "brisk_cuda::every_kernel_compiles_for_ampere_and_hopper",
                "NVRTC (libnvrtc.so) is not on the library path: .ci/run fetches it from PyPI",
            );
            // Without NVRTC, compiling says what to install.
            let e = compile(&SGD_UPDATE, "sm_90")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("libnvrtc"), "{e}");
            return Ok(());
        }
        for arch in ["sm_80", "sm_90"] {
            for k in KERNELS {
                let done = compile(k, arch)?;
                for entry in entries(k.source) {
                    assert!(
                        done.ptx.contains(&format!(".entry {entry}")),
                        "{arch}: no {entry} in the PTX"
                    );
                    // The CUBIN is an ELF image whose symbols name the entry points.
                    assert!(
                        done.cubin.windows(entry.len()).any(|w| w == entry.as_bytes()),
                        "{arch}: no {entry} in the CUBIN"
                    );
                }
                assert!(done.ptx.contains(&format!(".target {arch}")), "{arch}");
                assert!(
                    done.cubin.starts_with(b"\x7fELF"),
                    "{arch}: the CUBIN is not an ELF image"
                );
            }
        }
        // A second request is the cached result, not a new compile.
        assert!(Arc::ptr_eq(
            &compile(&SE_GATE, "sm_90")?,
            &compile(&SE_GATE, "sm_90")?
        ));
        // A source that does not compile names the kernel and carries NVRTC's log.
        static BROKEN: Kernel = Kernel {
            name: "broken",
            source: "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }",
        };
        let e = compile(&BROKEN, "sm_90")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("broken") && e.contains("undefined_name"), "{e}");
        Ok(())
    }
}
