//! Where the engine runs and in which number format: `device` and `precision` of recipes and
//! of the `--device` / `--precision` flags.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// The number format of the model's weights and matrix products.
///
/// * `f32`: everything in f32.
/// * `bf16`: mixed precision. Weight matrices (embedding, linear layers, head) are stored in
///   bf16 and every matrix product takes bf16 operands with f32 accumulation; norm weights,
///   biases, the residual stream, softmax/log-softmax, the loss, gradients, the optimiser's
///   master weights and moments stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// The dtype weight matrices are stored in.
    pub fn matrix_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => bail!("unknown precision `{other}`: expected f32 or bf16"),
        }
    }
}

/// A device name as written in recipes and flags: `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceName(String);

impl Default for DeviceName {
    fn default() -> Self {
        DeviceName("cpu".into())
    }
}

impl TryFrom<String> for DeviceName {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceName> for String {
    fn from(d: DeviceName) -> String {
        d.0
    }
}

impl FromStr for DeviceName {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let ok = s == "cpu"
            || s == "cuda"
            || s.strip_prefix("cuda:")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            bail!("unknown device `{s}`: expected cpu, cuda or cuda:N");
        }
        Ok(DeviceName(s.to_string()))
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl DeviceName {
    pub fn is_cpu(&self) -> bool {
        self.0 == "cpu"
    }

    /// N of `cuda:N` (0 for `cuda`); None for the CPU.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        if self.is_cpu() {
            return None;
        }
        Some(
            self.0
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        )
    }

    /// The candle device of a command whose whole engine runs on the host (`logprobs`,
    /// `merge`, vision-language `eval`): the CPU. A CUDA device is refused with an error that
    /// says why: without the `cuda` feature, how to rebuild; with it, after opening the device
    /// (so a missing driver is reported as such), which commands do run on the GPU. (`train`,
    /// `sft`, `bench trainer` open their device with `train::device::TrainDevice`; `generate`,
    /// `eval` and `bench engine` sample through `decoding::engine_for`.)
    pub fn open(&self) -> Result<Device> {
        if self.is_cpu() {
            return Ok(Device::Cpu);
        }
        #[cfg(feature = "cuda")]
        {
            let gpu = self.open_gpu()?;
            bail!(
                "device `{}` ({}): this command runs on the CPU only so far (on the GPU: `train`, \
                 `sft`, `bench trainer`, `generate`, `eval`, `logprobs` of text models, `bench engine`); use \
                 `--device cpu`",
                self.0,
                gpu.description()
            )
        }
        #[cfg(not(feature = "cuda"))]
        bail!("{}", self.no_cuda_build())
    }

    /// Opens the CUDA device (feature `cuda`): errors clearly on the CPU name or without a
    /// driver, naming the libraries looked for.
    #[cfg(feature = "cuda")]
    pub fn open_gpu(&self) -> Result<std::sync::Arc<crate::model::ops::cuda::Gpu>> {
        match self.cuda_ordinal() {
            Some(n) => crate::model::ops::cuda::Gpu::open(n),
            None => bail!("device `{}` is not a CUDA device", self.0),
        }
    }

    /// The message for a CUDA device in a build without the `cuda` feature.
    pub fn no_cuda_build(&self) -> String {
        format!(
            "device `{}`: this gpg-rl was built without the GPU engine; rebuild it with \
             `cargo build --release --features cuda` (no CUDA toolkit needed to build; an NVIDIA \
             driver to run), or use `--device cpu` / `device = \"cpu\"` in the recipe",
            self.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_are_refused() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("f32".parse::<Precision>().unwrap(), Precision::F32);
        assert!("fp8"
            .parse::<Precision>()
            .unwrap_err()
            .to_string()
            .contains("fp8"));
        assert!("cpu".parse::<DeviceName>().unwrap().open().is_ok());
        let err = "cuda:1".parse::<DeviceName>().unwrap().open().unwrap_err();
        assert!(err.to_string().contains("cuda:1"), "{err}");
        #[cfg(not(feature = "cuda"))]
        assert!(err.to_string().contains("--features cuda"), "{err}");
        let cuda: DeviceName = "cuda".parse().unwrap();
        assert_eq!(cuda.cuda_ordinal(), Some(0));
        assert_eq!(
            "cuda:3".parse::<DeviceName>().unwrap().cuda_ordinal(),
            Some(3)
        );
        assert_eq!(DeviceName::default().cuda_ordinal(), None);
        assert!("tpu".parse::<DeviceName>().is_err());
        assert!("cuda:x".parse::<DeviceName>().is_err());
    }
}
