//! `Network`: a spec, its weights (a candle `VarMap`) and the built model, with
//! checkpoints in safetensors under torchvision names plus a JSON sidecar holding the spec
//! (brisk-spec's `model.json`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use brisk_ops::BatchNormSync;

use brisk_precision::PrecisionPolicy;
use brisk_spec::{is_ignored_name, read_sidecar, write_sidecar, ModelSpec, TensorInfo};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::error::{Error, Result};
use crate::init::{init_rng, initial_value};
use crate::resnet::{Kernels, ResNet};

/// A model ready to run or train: its spec, its variables and the network built on them.
pub struct Network {
    spec: ModelSpec,
    varmap: VarMap,
    model: ResNet,
    kernels: Kernels,
    policy: PrecisionPolicy,
    sync: Option<Arc<dyn BatchNormSync>>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Network {
    /// A freshly initialised network (torchvision's initialisation), reproducible from `seed`.
    pub fn new(spec: ModelSpec, seed: u64, device: &Device) -> Result<Self> {
        spec.validate()?;
        let mut rng = init_rng(seed);
        let mut values = HashMap::new();
        for info in spec.tensors() {
            let value = initial_value(&info, &mut rng, device)?;
            values.insert(info.name, value);
        }
        Self::from_tensors(spec, values, device)
    }

    /// A network from named tensors (torchvision names), checked against the spec's
    /// tensor table exactly as a checkpoint is: every tensor present, f32, right shape,
    /// nothing else. `source` names where they came from in errors.
    pub fn from_named(
        spec: ModelSpec,
        tensors: Vec<(String, Tensor)>,
        source: &Path,
        device: &Device,
    ) -> Result<Self> {
        spec.validate()?;
        let mut expected: HashMap<String, Vec<usize>> =
            spec.tensors().into_iter().map(|t| (t.name, t.shape)).collect();
        let mut values = HashMap::new();
        for (name, t) in tensors {
            let Some(shape) = expected.remove(&name) else {
                return Err(Error::UnexpectedTensor {
                    path: source.to_path_buf(),
                    name,
                    shape: t.dims().to_vec(),
                });
            };
            if t.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    path: source.to_path_buf(),
                    name,
                    found: t.dims().to_vec(),
                    expected: shape,
                });
            }
            values.insert(name, t.to_dtype(DType::F32)?.to_device(device)?);
        }
        if let Some((name, shape)) = expected.into_iter().next() {
            return Err(Error::MissingTensor {
                path: source.to_path_buf(),
                name,
                expected: shape,
            });
        }
        Self::from_tensors(spec, values, device)
    }

    /// Builds a network from tensors already checked against the spec's tensor table.
    fn from_tensors(spec: ModelSpec, values: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
            for (name, value) in values {
                data.insert(name, Var::from_tensor(&value)?);
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let (kernels, policy) = (Kernels::for_device(device, false), PrecisionPolicy::default());
        let model = ResNet::build(&spec, vb, kernels, &policy, None)?;
        Ok(Self {
            spec,
            varmap,
            model,
            kernels,
            policy,
            sync: None,
        })
    }

    fn rebuild(&mut self) -> Result<()> {
        let device = self.model.device().clone();
        let vb = VarBuilder::from_varmap(&self.varmap, DType::F32, &device);
        self.model = ResNet::build(&self.spec, vb, self.kernels, &self.policy, self.sync.as_ref())?;
        Ok(())
    }

    /// Synchronises batch-norm across the ranks of a data-parallel job through `sync`
    /// (training statistics over every rank's batch); `None` goes back to per-rank
    /// statistics. Needs brisk's kernels.
    pub fn set_batch_norm_sync(&mut self, sync: Option<Arc<dyn BatchNormSync>>) -> Result<()> {
        self.sync = sync;
        self.rebuild()
    }

    /// Switches the convolution kernels (brisk's or candle's reference), keeping the weights.
    pub fn set_kernels(&mut self, kernels: Kernels) -> Result<()> {
        self.kernels = kernels;
        self.rebuild()
    }

    /// Computes with a precision policy (bf16/f16 layers), keeping the f32 weights, which
    /// remain the master copy: checkpoints stay f32 whatever the policy.
    pub fn set_precision(&mut self, policy: PrecisionPolicy) -> Result<()> {
        self.policy = policy;
        self.rebuild()
    }

    pub fn precision(&self) -> &PrecisionPolicy {
        &self.policy
    }

    /// The kernels the network runs on.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Whether batch-norm statistics are synchronised across ranks.
    pub fn has_batch_norm_sync(&self) -> bool {
        self.sync.is_some()
    }

    /// What synchronises batch-norm statistics across ranks, if anything.
    pub fn batch_norm_sync(&self) -> Option<&Arc<dyn BatchNormSync>> {
        self.sync.as_ref()
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.model.device()
    }

    /// Loads a checkpoint written by [`Network::save`] (or by PyTorch, given a sidecar).
    /// The spec comes from the sidecar `<file>.json`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let spec = read_sidecar(path)?;
        Self::load_with_spec(path, spec, device)
    }

    /// Loads a checkpoint's weights for a given spec. Every tensor the spec implies must be
    /// present as f32 with the right shape; any other tensor is an error, except
    /// torchvision's `num_batches_tracked`, which is accepted and dropped.
    pub fn load_with_spec(path: &Path, spec: ModelSpec, device: &Device) -> Result<Self> {
        spec.validate()?;
        let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read checkpoint", path, e))?;
        // brisk's files carry per-tensor checksums; another tool's load unverified.
        brisk_files::checksum::verify_safetensors(&bytes, path)?;
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::CheckpointFormat {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let expected: HashMap<String, Vec<usize>> =
            spec.tensors().into_iter().map(|t| (t.name, t.shape)).collect();
        let mut names = file.names();
        names.sort();
        let mut values = HashMap::new();
        for name in names {
            let view = file.tensor(name).map_err(|e| Error::CheckpointFormat {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: {e}"),
            })?;
            if is_ignored_name(name) {
                continue;
            }
            let Some(shape) = expected.get(name) else {
                return Err(Error::UnexpectedTensor {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    shape: view.shape().to_vec(),
                });
            };
            if view.shape() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    found: view.shape().to_vec(),
                    expected: shape.clone(),
                });
            }
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(Error::DtypeMismatch {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    found: format!("{:?}", view.dtype()),
                    expected: "F32",
                });
            }
            let tensor = Tensor::from_raw_buffer(view.data(), DType::F32, shape, device)?;
            values.insert(name.to_string(), tensor);
        }
        for info in spec.tensors() {
            if !values.contains_key(&info.name) {
                return Err(Error::MissingTensor {
                    path: path.to_path_buf(),
                    name: info.name,
                    expected: info.shape,
                });
            }
        }
        Self::from_tensors(spec, values, device)
    }

    /// Writes the weights (safetensors, torchvision names, per-tensor checksums in the
    /// metadata) and the sidecar `<file>.json`, each atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self.named_tensors()?;
        let views: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        let bytes = brisk_files::checksum::safetensors_with_checksums(views, HashMap::new(), path)?;
        brisk_files::write_atomic(path, &bytes)?;
        Ok(write_sidecar(path, &self.spec)?)
    }

    /// Every tensor (parameters and buffers) by torchvision name, sorted by name.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        let mut out: Vec<(String, Tensor)> = data
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Every variable with its entry in the spec's tensor table, sorted by name: the one
    /// place a variable's role (weight, bias, batch-norm parameter, running statistic) and
    /// layer are known.
    pub fn vars(&self) -> Result<Vec<(TensorInfo, Var)>> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        let mut out = Vec::with_capacity(data.len());
        for info in self.spec.tensors() {
            let var = data
                .get(&info.name)
                .cloned()
                .ok_or_else(|| Error::MissingTensor {
                    path: "the built network".into(),
                    name: info.name.clone(),
                    expected: info.shape.clone(),
                })?;
            out.push((info, var));
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    /// Every variable (parameters and running statistics) by name, sorted by name: what a
    /// distributed run broadcasts from rank 0.
    pub fn all_vars(&self) -> Result<Vec<(String, Var)>> {
        self.vars_where(|_| true)
    }

    /// The trainable variables (everything but batch-norm running statistics), by name.
    pub fn trainable_vars(&self) -> Result<Vec<(String, Var)>> {
        self.vars_where(|t| !t.role.is_buffer())
    }

    /// The batch-norm running statistics, by name: what a distributed run averages.
    pub fn buffer_vars(&self) -> Result<Vec<(String, Var)>> {
        self.vars_where(|t| t.role.is_buffer())
    }

    /// The variables whose tensor-table entry passes `keep`, by name, sorted by name.
    pub fn vars_where(&self, keep: impl Fn(&TensorInfo) -> bool) -> Result<Vec<(String, Var)>> {
        Ok(self
            .vars()?
            .into_iter()
            .filter(|(info, _)| keep(info))
            .map(|(info, var)| (info.name, var))
            .collect())
    }

    /// Logits for a batch of f32 images `[N, C, H, W]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.model.forward_t(x, train)
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn model(&self) -> &ResNet {
        &self.model
    }
}

/// Checks a model file of any brisk format (dense, sparse, int8) and its `model.json`
/// sidecar without building the network: every checksum must match. `Absent` when the
/// weights carry none (another tool wrote them).
pub fn verify_model_file(path: &Path) -> Result<brisk_files::Checksum> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
    let status = brisk_files::checksum::verify_safetensors(&bytes, path)?;
    read_sidecar(path)?;
    Ok(status)
}
