//! JSON Schemas of the YAML formats, generated from the Rust config types: the spec is the docs
//! is the schema. `schemas/*.schema.json` hold this output, committed; a test fails on drift.

use schemars::generate::SchemaSettings;
use serde_json::Value;

/// Which format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// A pipeline file (`kind: Pipeline`).
    Pipeline,
    /// A field map file under mappings/ (`kind: FieldMap`).
    Fieldmap,
    /// A pipeline test file (`*.test.yaml`).
    Test,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Pipeline, Kind::Fieldmap, Kind::Test];

    /// As written on the command line: `--kind pipeline`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pipeline => "pipeline",
            Kind::Fieldmap => "fieldmap",
            Kind::Test => "test",
        }
    }

    /// The committed file under schemas/.
    pub fn file_name(self) -> &'static str {
        match self {
            Kind::Pipeline => "pipeline.schema.json",
            Kind::Fieldmap => "fieldmap.schema.json",
            Kind::Test => "pipeline-test.schema.json",
        }
    }
}

pub fn generate(kind: Kind) -> Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let schema = match kind {
        Kind::Pipeline => generator.into_root_schema_for::<crate::pipeline::PipelineConfig>(),
        Kind::Fieldmap => generator.into_root_schema_for::<crate::map::fields::FieldMapFile>(),
        Kind::Test => generator.into_root_schema_for::<crate::testing::TestFile>(),
    };
    let mut v = schema.to_value();
    if let Value::Object(o) = &mut v {
        o.insert("$id".into(), Value::String(format!("https://schemas.switchyard.dev/{}", kind.file_name())));
    }
    v
}

/// The text written to the committed file.
pub fn render(kind: Kind) -> String {
    let mut s = serde_json::to_string_pretty(&generate(kind)).expect("schemas serialize");
    s.push('\n');
    s
}
