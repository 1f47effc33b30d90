//! Where a training run (`train`, `sft`) computes: the CPU engine, or (feature `cuda`) one GPU.
//!
//! On a GPU the host [`crate::model::Qwen2`] still holds the configuration and is what
//! checkpoints are written from (brought up to date from the device before each write); the
//! weights that are trained and sampled from live once on the GPU
//! (`model::cuda_train::CudaTrainStep`, read in place by the CUDA decoder).
//!
//! What a GPU run does not support is refused before the device is opened or anything loaded
//! ([`TrainDevice::open_for`]): LoRA and vision-language models. A build without the `cuda`
//! feature refuses a CUDA device first, saying how to rebuild. A data-parallel GPU run is one
//! process per GPU: `device = "cuda"` opens `cuda:<local rank>` (the launcher's node-local
//! rank), `cuda:N` opens N as written (e.g. with one visible device per rank); the gradients are
//! summed by NCCL (`train::collective::nccl`) or over the host collective.

use std::path::Path;

use anyhow::{bail, Result};

use crate::model::DeviceName;

/// The device a run trains on.
#[derive(Debug, Clone)]
pub enum TrainDevice {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::model::ops::cuda::Gpu>),
}

/// What a run asks of its device (checked by [`TrainDevice::open_for`]).
#[derive(Debug, Clone, Copy)]
pub struct RunNeeds<'a> {
    /// The model directory, for messages.
    pub model: &'a Path,
    /// Its kind (a vision-language model is refused on a GPU).
    pub kind: crate::model::ModelKind,
    pub lora: bool,
    /// Ranks of the data-parallel run (1: a single process).
    pub world: usize,
}

impl TrainDevice {
    /// Opens `name`: the CPU, or the GPU `cuda[:N]`. Without the `cuda` feature a CUDA name is
    /// refused with the rebuild instruction; with it, a machine without a driver or without
    /// device N is refused with what was looked for (the library file names, the device count).
    pub fn open(name: &DeviceName) -> Result<Self> {
        if name.is_cpu() {
            return Ok(TrainDevice::Cpu);
        }
        #[cfg(feature = "cuda")]
        {
            Ok(TrainDevice::Cuda(name.open_gpu()?))
        }
        #[cfg(not(feature = "cuda"))]
        bail!("{}", name.no_cuda_build())
    }

    /// Opens `name` for a run that needs `needs`: on a CUDA device, first refuses what the GPU
    /// path does not support (so the reason is given also on a machine without a GPU), then
    /// opens the device ([`Self::open`]).
    pub fn open_for(name: &DeviceName, needs: RunNeeds<'_>) -> Result<Self> {
        if !name.is_cpu() && cfg!(feature = "cuda") {
            refuse_on_gpu(&name.to_string(), needs)?;
        }
        Self::open(&rank_device(
            name,
            needs.world,
            super::collective::local_rank(),
        ))
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, TrainDevice::Cpu)
    }

    /// The device's name for messages (`cpu`, `cuda:0 (NVIDIA H200, sm_90)`).
    pub fn description(&self) -> String {
        match self {
            TrainDevice::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            TrainDevice::Cuda(gpu) => gpu.description().to_string(),
        }
    }
}

/// The device this rank opens: with several ranks, `cuda` (no index) is `cuda:<local rank>`,
/// one GPU per process on each node; anything else as written.
pub fn rank_device(name: &DeviceName, world: usize, local_rank: Option<usize>) -> DeviceName {
    match local_rank {
        Some(r) if world > 1 && name.to_string() == "cuda" => format!("cuda:{r}")
            .parse()
            .expect("cuda:N is a device name"),
        _ => name.clone(),
    }
}

/// The GPU path's limits (a function of the request only, so that it is tested without a GPU).
pub fn refuse_on_gpu(device: &str, needs: RunNeeds<'_>) -> Result<()> {
    if needs.lora {
        bail!(
            "device `{device}` with [lora]: LoRA training runs on the CPU only so far (the GPU \
             trains every parameter); remove [lora] for full fine-tuning on the GPU, or use \
             device = \"cpu\""
        );
    }
    if needs.kind.has_tower() {
        bail!(
            "{}: a vision-language model on device `{device}`: the GPU engine runs the Qwen2 \
             text decoder only; train vision-language models with device = \"cpu\"",
            needs.model.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(model: &Path) -> RunNeeds<'_> {
        RunNeeds {
            model,
            kind: crate::model::ModelKind::of_dir(model),
            lora: false,
            world: 1,
        }
    }

    #[test]
    fn the_cpu_trains_everything() {
        let dir = tempfile::tempdir().unwrap();
        let all = RunNeeds {
            lora: true,
            world: 4,
            ..needs(dir.path())
        };
        assert!(TrainDevice::open_for(&"cpu".parse().unwrap(), all)
            .unwrap()
            .is_cpu());
    }

    #[test]
    fn each_rank_opens_its_node_local_gpu() {
        let d = |s: &str| s.parse::<DeviceName>().unwrap();
        assert_eq!(rank_device(&d("cuda"), 4, Some(3)), d("cuda:3"));
        assert_eq!(rank_device(&d("cuda"), 1, Some(3)), d("cuda"));
        assert_eq!(rank_device(&d("cuda"), 4, None), d("cuda"));
        assert_eq!(rank_device(&d("cuda:1"), 4, Some(3)), d("cuda:1"));
        assert_eq!(rank_device(&d("cpu"), 4, Some(3)), d("cpu"));
    }

    #[test]
    fn gpu_limits_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        refuse_on_gpu("cuda:0", needs(dir.path())).unwrap();
        let err = |n: RunNeeds<'_>| refuse_on_gpu("cuda:0", n).unwrap_err().to_string();
        // Several ranks train on GPUs (NCCL), one GPU each.
        refuse_on_gpu(
            "cuda",
            RunNeeds {
                world: 2,
                ..needs(dir.path())
            },
        )
        .unwrap();
        let e = err(RunNeeds {
            lora: true,
            ..needs(dir.path())
        });
        assert!(e.contains("LoRA") && e.contains("cuda:0"), "{e}");
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "qwen2_vl", "vision_config": {}}"#,
        )
        .unwrap();
        let e = err(needs(dir.path()));
        assert!(e.contains("vision-language"), "{e}");
    }

    /// Without the `cuda` feature a CUDA device is refused with the rebuild instruction; with it
    /// on a machine without a driver, with the library file names looked for. Never a panic.
    #[test]
    fn a_cuda_device_without_gpu_or_feature_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["cuda", "cuda:1"] {
            let result = TrainDevice::open_for(&name.parse().unwrap(), needs(dir.path()));
            #[cfg(not(feature = "cuda"))]
            {
                let e = result.unwrap_err().to_string();
                assert!(e.contains("--features cuda") && e.contains(name), "{e}");
            }
            #[cfg(feature = "cuda")]
            if let Err(e) = result {
                let e = e.to_string();
                assert!(
                    e.contains("libcuda.so") || e.contains("CUDA device") || e.contains("lib"),
                    "{e}"
                );
            }
        }
    }
}
