//! Argument checks shared by the ops, and the bridge between candle tensors and the `&[f32]`
//! slices the CPU kernels work on.

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Layout, Shape, Storage, Tensor};

/// The kernel family that runs an op, chosen from the device of its inputs.
pub(crate) enum Backend {
    Cpu,
}

/// Checks that all `tensors` live on one device and picks the kernel family for it.
/// Devices without kernels get the error "`op`: no CUDA kernel yet" (or Metal).
pub(crate) fn backend(op: &str, tensors: &[(&str, &Tensor)]) -> Result<Backend> {
    let Some((first_name, first)) = tensors.first() else {
        bail!("{op}: no tensor arguments");
    };
    for (name, t) in &tensors[1..] {
        if !t.device().same_device(first.device()) {
            bail!(
                "{op}: `{name}` is on {:?} but `{first_name}` is on {:?}",
                t.device().location(),
                first.device().location()
            );
        }
    }
    match first.device() {
        Device::Cpu => Ok(Backend::Cpu),
        Device::Cuda(_) => bail!("{op}: no CUDA kernel yet"),
        Device::Metal(_) => bail!("{op}: no Metal kernel"),
    }
}

/// Checks that `t` is a contiguous f32 tensor of rank `rank` and returns its dims.
pub(crate) fn f32_dims<'a>(
    op: &str,
    name: &str,
    t: &'a Tensor,
    rank: usize,
) -> Result<&'a [usize]> {
    if t.dtype() != DType::F32 {
        bail!("{op}: `{name}` must be f32, got {:?}", t.dtype());
    }
    if !t.is_contiguous() {
        bail!("{op}: `{name}` must be contiguous (call .contiguous() first)");
    }
    let dims = t.dims();
    if dims.len() != rank {
        bail!("{op}: `{name}` must have rank {rank}, got shape {dims:?}");
    }
    Ok(dims)
}

/// Checks that `t` has exactly the shape `expected`.
pub(crate) fn expect_dims(op: &str, name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    let dims = f32_dims(op, name, t, expected.len())?;
    if dims != expected {
        bail!("{op}: `{name}` must have shape {expected:?}, got {dims:?}");
    }
    Ok(())
}

/// The f32 elements of a contiguous CPU tensor, given its storage guard and layout
/// (from `Tensor::storage_and_layout`).
pub(crate) fn cpu_slice<'a>(
    op: &str,
    name: &str,
    storage: &'a Storage,
    layout: &Layout,
) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        bail!("{op}: `{name}` is not on the CPU");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| anyhow!("{op}: `{name}` must be contiguous"))?;
    let all = cpu
        .as_slice::<f32>()
        .map_err(|e| anyhow!("{op}: `{name}`: {e}"))?;
    all.get(start..end)
        .ok_or_else(|| anyhow!("{op}: `{name}` layout exceeds its storage"))
}

/// Wraps a kernel's output vector as a CPU tensor of the given shape.
pub(crate) fn cpu_tensor<S: Into<Shape>>(op: &str, data: Vec<f32>, shape: S) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu).map_err(|e| anyhow!("{op}: building output: {e}"))
}

/// A contiguous weight matrix as the CPU kernels see it: f32 or bf16 elements, row-major.
#[derive(Clone, Copy)]
pub(crate) enum WeightSlice<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

/// Calls `f` with the elements of a contiguous f32 or bf16 CPU tensor (no copy).
pub(crate) fn with_weight<R>(
    op: &str,
    name: &str,
    t: &Tensor,
    f: impl FnOnce(WeightSlice<'_>) -> R,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("{op}: `{name}` is not on the CPU");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| anyhow!("{op}: `{name}` must be contiguous"))?;
    let slice = match t.dtype() {
        DType::F32 => WeightSlice::F32(
            cpu.as_slice::<f32>()
                .map_err(|e| anyhow!("{op}: `{name}`: {e}"))?
                .get(start..end)
                .ok_or_else(|| anyhow!("{op}: `{name}` layout exceeds its storage"))?,
        ),
        DType::BF16 => WeightSlice::Bf16(
            cpu.as_slice::<half::bf16>()
                .map_err(|e| anyhow!("{op}: `{name}`: {e}"))?
                .get(start..end)
                .ok_or_else(|| anyhow!("{op}: `{name}` layout exceeds its storage"))?,
        ),
        other => bail!("{op}: `{name}` must be f32 or bf16, got {other:?}"),
    };
    Ok(f(slice))
}

/// A contiguous f32 or bf16 CPU tensor's elements, writable.
pub enum WeightSliceMut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [half::bf16]),
}

/// Runs `f` on the storage of `t` in place: every tensor sharing that storage (clones of `t`)
/// sees the change. The caller must not hold a read guard of the same storage.
pub fn update_in_place(t: &Tensor, f: impl FnOnce(WeightSliceMut<'_>) -> Result<()>) -> Result<()> {
    struct Op<F>(
        std::sync::Mutex<Option<F>>,
        std::sync::Mutex<Option<anyhow::Error>>,
    );
    impl<F: FnOnce(WeightSliceMut<'_>) -> Result<()>> candle_core::InplaceOp1 for Op<F> {
        fn name(&self) -> &'static str {
            "update_in_place"
        }
        fn cpu_fwd(
            &self,
            storage: &mut candle_core::CpuStorage,
            layout: &Layout,
        ) -> candle_core::Result<()> {
            let Some((start, end)) = layout.contiguous_offsets() else {
                return Err(candle_core::Error::Msg(
                    "update_in_place: not contiguous".into(),
                ));
            };
            let Some(f) = self.0.lock().ok().and_then(|mut g| g.take()) else {
                return Err(candle_core::Error::Msg(
                    "update_in_place: called twice".into(),
                ));
            };
            let slice = match storage {
                candle_core::CpuStorage::F32(v) => WeightSliceMut::F32(&mut v[start..end]),
                candle_core::CpuStorage::BF16(v) => WeightSliceMut::Bf16(&mut v[start..end]),
                _ => {
                    return Err(candle_core::Error::Msg(
                        "update_in_place: tensor must be f32 or bf16".into(),
                    ))
                }
            };
            if let Err(e) = f(slice) {
                if let Ok(mut slot) = self.1.lock() {
                    *slot = Some(e);
                }
            }
            Ok(())
        }
    }
    let op = Op(std::sync::Mutex::new(Some(f)), std::sync::Mutex::new(None));
    t.inplace_op1(&op)
        .map_err(|e| anyhow!("update_in_place: {e}"))?;
    if let Some(e) = op.1.lock().ok().and_then(|mut g| g.take()) {
        return Err(e);
    }
    Ok(())
}
