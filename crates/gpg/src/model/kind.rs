//! What kind of model a Hugging Face directory holds, read once from its config.json.
//!
//! A text model is a vision-language model without a tower: the kind says only whether a
//! vision tower (and an image processor) come with the decoder. Text families (Qwen2, Qwen3,
//! Llama) are told apart by the decoder's config, not here.

use std::path::Path;

use serde_json::Value;

/// Whether a model directory holds a decoder alone or a decoder with a vision tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A decoder-only language model.
    Text,
    /// A Qwen2-VL-family model (`model_type` `qwen2_vl` / `qwen2_5_vl`): a vision tower whose
    /// embeddings are spliced into the decoder's input.
    VisionLanguage,
}

impl ModelKind {
    /// The kind `dir/config.json` declares by its `model_type`. A directory without a readable
    /// config.json is taken as a text model, so that its loader reports what is missing.
    pub fn of_dir(dir: &Path) -> Self {
        let model_type = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| {
                v.get("model_type")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            });
        Self::of_model_type(model_type.as_deref().unwrap_or(""))
    }

    /// The kind of a config.json `model_type`.
    pub fn of_model_type(model_type: &str) -> Self {
        match model_type {
            "qwen2_vl" | "qwen2_5_vl" => ModelKind::VisionLanguage,
            _ => ModelKind::Text,
        }
    }

    /// Whether the model has a vision tower.
    pub fn has_tower(self) -> bool {
        self == ModelKind::VisionLanguage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_is_read_from_model_type() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ModelKind::of_dir(dir.path()), ModelKind::Text);
        for (model_type, kind) in [
            ("qwen2", ModelKind::Text),
            ("qwen3", ModelKind::Text),
            ("llama", ModelKind::Text),
            ("qwen2_vl", ModelKind::VisionLanguage),
            ("qwen2_5_vl", ModelKind::VisionLanguage),
        ] {
            std::fs::write(
                dir.path().join("config.json"),
                format!(r#"{{"model_type": "{model_type}"}}"#),
            )
            .unwrap();
            assert_eq!(ModelKind::of_dir(dir.path()), kind, "{model_type}");
        }
        std::fs::write(dir.path().join("config.json"), "not json").unwrap();
        assert_eq!(ModelKind::of_dir(dir.path()), ModelKind::Text);
    }
}
