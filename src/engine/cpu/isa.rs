//! The instruction set the CPU kernels use, picked once at start-up: the fastest this CPU runs, or the one
//! `KTO_ISA` names (`portable`, `avx2`, `avx512`). Every kernel with a choice dispatches on `active()`, and each variant
//! can also be called directly (`gemm_with`), so tests check every set the machine supports against the naive
//! kernels in one process, and CI runs the whole suite once more with `KTO_ISA=portable`.
//!
//! `portable` is the code without kto's own SIMD: the compiler's auto-vectorised loops and matrixmultiply
//! (which picks its own kernels at run time). It is what aarch64 runs.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    /// x86-64 with AVX2 and FMA: our 6×16 SGEMM micro-kernel.
    Avx2,
    /// x86-64 with AVX-512F: our 12×32 SGEMM micro-kernel (the element-wise kernels stay those of AVX2).
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == s.trim().to_ascii_lowercase())
    }

    /// Whether this CPU runs the set.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Isa::Avx2.supported() && std::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
        }
    }

    /// The sets this CPU runs, slowest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }
}

/// The set `KTO_ISA` asks for (unset: the fastest available), or why it cannot be had. The command line calls
/// this first, so a bad value is a one-line error before any work.
pub fn from_env() -> Result<Isa, String> {
    let fastest = *Isa::available().last().expect("portable is always available");
    match std::env::var("KTO_ISA") {
        Err(_) => Ok(fastest),
        Ok(v) => {
            let names: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
            match Isa::parse(&v) {
                Some(isa) if isa.supported() => Ok(isa),
                Some(isa) => Err(format!("KTO_ISA={v}: this CPU has no {}; it runs {}", isa.name(), names.join(", "))),
                None => Err(format!("KTO_ISA={v}: unknown; this CPU runs {}", names.join(", "))),
            }
        }
    }
}

/// Defines `$name(isa, args…)`, which runs the `#[inline(always)]` function `$inner(args…)` compiled for `isa`'s
/// vectors: the compiler's loops in it use 256- or 512-bit registers instead of baseline x86-64's 128-bit ones
/// (the element-wise kernels and single-query attention of decoding). The bits stay those of `portable`: plain
/// f32 arithmetic rounds each operation alike at any width, and Rust never fuses a multiply and an add on its
/// own. (A generic wrapper taking a closure was tried: the compiler left the larger closures out of line, in
/// baseline code.) `isa` must be a set the CPU runs, as `active()` and `Isa::available()` give.
macro_rules! vectorised {
    ($(#[$m:meta])* $vis:vis $([$unsafe:tt])? fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $inner:path) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis $($unsafe)? fn $name(isa: $crate::engine::cpu::isa::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $($unsafe)? { $inner($($arg),*) }
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $($unsafe)? { $inner($($arg),*) }
                }
                match isa {
                    // SAFETY: the CPU runs the set (the caller's promise); `$inner`'s own contract is the caller's.
                    $crate::engine::cpu::isa::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::engine::cpu::isa::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::engine::cpu::isa::Isa::Portable => {}
                }
            }
            let _ = isa;
            $($unsafe)? { $inner($($arg),*) }
        }
    };
}
pub(crate) use vectorised;

/// The set in use, fixed at the first call (an unusable `KTO_ISA` falls back to the fastest available; the
/// command line has refused it before this runs).
pub fn active() -> Isa {
    static ACTIVE: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ACTIVE.get_or_init(|| from_env().unwrap_or_else(|_| *Isa::available().last().expect("portable")))
}
