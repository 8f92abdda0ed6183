//! Choosing where tensors live: a wgpu adapter (Vulkan, Metal, DX12, GL, WebGPU) or burn's Flex
//! CPU backend.
//!
//! `auto` prefers a hardware GPU, then a software adapter (Mesa lavapipe / llvmpipe, SwiftShader,
//! WARP), then Flex. An explicit request that cannot be met is an error that lists what the
//! machine has. The choice is memoised per request, because burn's wgpu runtime can be
//! initialised only once per adapter and API in a process.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// Environment variable read when no `--device` is given.
pub const DEVICE_ENV: &str = "PORTAFLOW_DEVICE";

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceRequest {
    /// Hardware GPU, else software adapter, else CPU.
    Auto,
    Vulkan,
    Metal,
    Dx12,
    Gl,
    WebGpu,
    /// burn's Flex CPU backend.
    Cpu,
}

impl DeviceRequest {
    pub const NAMES: &'static str = "auto, vulkan, metal, dx12, gl, webgpu, cpu";

    /// The request from `--device` if given, else from `PORTAFLOW_DEVICE`, else `auto`.
    pub fn from_arg_or_env(arg: Option<&str>) -> Result<Self, DeviceError> {
        match arg {
            Some(value) => value.parse(),
            None => match std::env::var(DEVICE_ENV) {
                Ok(value) if !value.trim().is_empty() => value.parse().map_err(|e| match e {
                    DeviceError::UnknownName(name) => DeviceError::UnknownEnv(name),
                    other => other,
                }),
                _ => Ok(Self::Auto),
            },
        }
    }

    /// The wgpu graphics API this request pins, if any.
    #[cfg(not(target_family = "wasm"))]
    fn api(self) -> Option<Api> {
        match self {
            Self::Vulkan => Some(Api::Vulkan),
            Self::Metal => Some(Api::Metal),
            Self::Dx12 => Some(Api::Dx12),
            Self::Gl => Some(Api::Gl),
            Self::WebGpu => Some(Api::WebGpu),
            Self::Auto | Self::Cpu => None,
        }
    }
}

impl FromStr for DeviceRequest {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "vulkan" => Self::Vulkan,
            "metal" => Self::Metal,
            "dx12" => Self::Dx12,
            "gl" | "opengl" | "gles" => Self::Gl,
            "webgpu" => Self::WebGpu,
            "cpu" | "flex" => Self::Cpu,
            _ => return Err(DeviceError::UnknownName(s.to_string())),
        })
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Vulkan => "vulkan",
            Self::Metal => "metal",
            Self::Dx12 => "dx12",
            Self::Gl => "gl",
            Self::WebGpu => "webgpu",
            Self::Cpu => "cpu",
        })
    }
}

/// A graphics API wgpu can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    Vulkan,
    Metal,
    Dx12,
    Gl,
    WebGpu,
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Vulkan => "Vulkan",
            Self::Metal => "Metal",
            Self::Dx12 => "DX12",
            Self::Gl => "GL",
            Self::WebGpu => "WebGPU",
        })
    }
}

/// Kind of adapter, as wgpu reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AdapterType {
    DiscreteGpu,
    IntegratedGpu,
    VirtualGpu,
    /// A software rasteriser (lavapipe, llvmpipe, SwiftShader, WARP).
    Cpu,
    Other,
}

/// One adapter wgpu can see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterReport {
    pub name: String,
    pub api: Api,
    pub adapter_type: AdapterType,
    pub driver: String,
    /// Index among adapters of the same type on the same API (burn's `DeviceKind` index).
    pub index_in_type: usize,
}

impl AdapterReport {
    /// Whether this adapter renders in software on the CPU.
    pub fn is_software(&self) -> bool {
        let name = self.name.to_ascii_lowercase();
        self.adapter_type == AdapterType::Cpu
            || ["llvmpipe", "lavapipe", "swiftshader", "basic render"]
                .iter()
                .any(|s| name.contains(s))
    }

    #[cfg(not(target_family = "wasm"))]
    fn rank(&self) -> (u8, u8) {
        let hardware = match (self.is_software(), self.adapter_type) {
            (true, _) => 4,
            (false, AdapterType::DiscreteGpu) => 0,
            (false, AdapterType::IntegratedGpu) => 1,
            (false, AdapterType::VirtualGpu) => 2,
            (false, _) => 3,
        };
        let api = match self.api {
            Api::Vulkan | Api::Metal | Api::Dx12 | Api::WebGpu => 0,
            Api::Gl => 1,
        };
        (hardware, api)
    }
}

impl fmt::Display for AdapterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} ({:?}{}{})",
            self.name,
            self.api,
            self.adapter_type,
            if self.is_software() { ", software" } else { "" },
            if self.driver.is_empty() {
                String::new()
            } else {
                format!(", driver {}", self.driver)
            }
        )
    }
}

/// Where the engine runs.
#[derive(Clone, Debug)]
pub struct ChosenDevice {
    pub device: Device,
    pub request: DeviceRequest,
    pub backend: Backend,
}

/// The backend behind a [`ChosenDevice`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A wgpu adapter.
    Wgpu(AdapterReport),
    /// burn's Flex CPU backend.
    Flex,
}

impl ChosenDevice {
    /// The wgpu adapter in use, if any.
    pub fn adapter(&self) -> Option<&AdapterReport> {
        match &self.backend {
            Backend::Wgpu(adapter) => Some(adapter),
            Backend::Flex => None,
        }
    }

    /// Flex CPU device (always available).
    pub fn cpu() -> Self {
        Self {
            device: Device::flex(),
            request: DeviceRequest::Cpu,
            backend: Backend::Flex,
        }
    }
}

impl fmt::Display for ChosenDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            Backend::Wgpu(adapter) => write!(f, "wgpu: {adapter}"),
            Backend::Flex => f.write_str("cpu: burn Flex backend"),
        }
    }
}

/// Errors from choosing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: expected one of {names}", names = DeviceRequest::NAMES)]
    UnknownName(String),
    #[error("{env}=`{0}` is not a device: expected one of {names}", env = DEVICE_ENV, names = DeviceRequest::NAMES)]
    UnknownEnv(String),
    #[error("no {api} adapter on this machine; {available}")]
    NotAvailable { api: Api, available: String },
    #[error("could not start {adapter}: {message}")]
    Init { adapter: String, message: String },
    #[error("the {0} device is only available in a browser build (portaflow-web)")]
    BrowserOnly(Api),
}

#[cfg(not(target_family = "wasm"))]
fn describe_available(adapters: &[AdapterReport]) -> String {
    if adapters.is_empty() {
        "wgpu sees no adapter at all (for a software Vulkan adapter install Mesa's lavapipe: \
         `apt-get install mesa-vulkan-drivers`); `--device cpu` always works"
            .to_string()
    } else {
        let list: Vec<String> = adapters.iter().map(|a| a.to_string()).collect();
        format!("available: {}; or `--device cpu`", list.join("; "))
    }
}

#[cfg(not(target_family = "wasm"))]
mod native {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use burn::tensor::wgpu::WgpuBackend;
    use burn::tensor::{Device, DeviceKind};

    use super::*;

    fn api_of(backend: wgpu::Backend) -> Option<Api> {
        match backend {
            wgpu::Backend::Vulkan => Some(Api::Vulkan),
            wgpu::Backend::Metal => Some(Api::Metal),
            wgpu::Backend::Dx12 => Some(Api::Dx12),
            wgpu::Backend::Gl => Some(Api::Gl),
            wgpu::Backend::BrowserWebGpu => Some(Api::WebGpu),
            _ => None,
        }
    }

    fn wgpu_backend(api: Api) -> wgpu::Backend {
        match api {
            Api::Vulkan => wgpu::Backend::Vulkan,
            Api::Metal => wgpu::Backend::Metal,
            Api::Dx12 => wgpu::Backend::Dx12,
            Api::Gl => wgpu::Backend::Gl,
            Api::WebGpu => wgpu::Backend::BrowserWebGpu,
        }
    }

    fn burn_api(api: Api) -> WgpuBackend {
        match api {
            Api::Vulkan => WgpuBackend::Vulkan,
            Api::Metal => WgpuBackend::Metal,
            Api::Dx12 => WgpuBackend::Dx12,
            Api::Gl => WgpuBackend::Gl,
            Api::WebGpu => WgpuBackend::WebGpu,
        }
    }

    fn adapter_type(t: wgpu::DeviceType) -> AdapterType {
        match t {
            wgpu::DeviceType::DiscreteGpu => AdapterType::DiscreteGpu,
            wgpu::DeviceType::IntegratedGpu => AdapterType::IntegratedGpu,
            wgpu::DeviceType::VirtualGpu => AdapterType::VirtualGpu,
            wgpu::DeviceType::Cpu => AdapterType::Cpu,
            wgpu::DeviceType::Other => AdapterType::Other,
        }
    }

    /// Every adapter wgpu can see on this machine, API by API, in wgpu's own order (which is the
    /// order burn indexes them in).
    pub fn adapters() -> Vec<AdapterReport> {
        static ADAPTERS: OnceLock<Vec<AdapterReport>> = OnceLock::new();
        ADAPTERS
            .get_or_init(|| {
                let mut reports = Vec::new();
                for api in [Api::Vulkan, Api::Metal, Api::Dx12, Api::Gl] {
                    let backend = wgpu_backend(api);
                    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
                        backends: backend.into(),
                        ..wgpu::InstanceDescriptor::new_without_display_handle()
                    });
                    let mut per_type: HashMap<AdapterType, usize> = HashMap::new();
                    for adapter in pollster::block_on(instance.enumerate_adapters(backend.into())) {
                        let info = adapter.get_info();
                        let Some(api) = api_of(info.backend) else {
                            continue;
                        };
                        let adapter_type = adapter_type(info.device_type);
                        let index = per_type.entry(adapter_type).or_default();
                        reports.push(AdapterReport {
                            name: info.name,
                            api,
                            adapter_type,
                            driver: [info.driver, info.driver_info]
                                .into_iter()
                                .filter(|s| !s.is_empty())
                                .collect::<Vec<_>>()
                                .join(" "),
                            index_in_type: *index,
                        });
                        *index += 1;
                    }
                }
                reports
            })
            .clone()
    }

    fn device_kind(adapter: &AdapterReport) -> DeviceKind {
        match adapter.adapter_type {
            AdapterType::DiscreteGpu => DeviceKind::DiscreteGpu(adapter.index_in_type),
            AdapterType::IntegratedGpu => DeviceKind::IntegratedGpu(adapter.index_in_type),
            AdapterType::VirtualGpu => DeviceKind::VirtualGpu(adapter.index_in_type),
            // burn addresses only the first CPU adapter of an API.
            AdapterType::Cpu => DeviceKind::Cpu,
            AdapterType::Other => DeviceKind::DefaultDevice,
        }
    }

    fn start(adapter: &AdapterReport) -> Result<Device, DeviceError> {
        Device::wgpu_options()
            .device_kind(device_kind(adapter))
            .graphics_api(burn_api(adapter.api))
            .init()
            .map_err(|e| DeviceError::Init {
                adapter: adapter.to_string(),
                message: e.to_string(),
            })
    }

    /// The best adapter for `request` among `adapters`, or `None` to use the CPU.
    pub(super) fn pick(
        request: DeviceRequest,
        adapters: &[AdapterReport],
    ) -> Result<Option<AdapterReport>, DeviceError> {
        if request == DeviceRequest::Cpu {
            return Ok(None);
        }
        let mut candidates: Vec<&AdapterReport> = adapters
            .iter()
            .filter(|a| request.api().is_none_or(|api| a.api == api))
            // burn cannot address a second software adapter or an `Other` one by index.
            .filter(|a| match a.adapter_type {
                AdapterType::Cpu => a.index_in_type == 0,
                AdapterType::Other => false,
                _ => true,
            })
            .collect();
        candidates.sort_by_key(|a| a.rank());
        match (candidates.first(), request.api()) {
            (Some(best), _) => Ok(Some((*best).clone())),
            (None, None) => Ok(None),
            (None, Some(Api::WebGpu)) => Err(DeviceError::BrowserOnly(Api::WebGpu)),
            (None, Some(api)) => Err(DeviceError::NotAvailable {
                api,
                available: describe_available(adapters),
            }),
        }
    }

    /// The device for `request`, started once per process and shared afterwards.
    pub fn select(request: DeviceRequest) -> Result<ChosenDevice, DeviceError> {
        static CHOSEN: OnceLock<Mutex<HashMap<DeviceRequest, ChosenDevice>>> = OnceLock::new();
        static STARTED: OnceLock<Mutex<HashMap<(String, Api), Device>>> = OnceLock::new();
        let mut chosen = CHOSEN.get_or_init(Default::default).lock().unwrap();
        if let Some(found) = chosen.get(&request) {
            return Ok(found.clone());
        }
        // The CPU needs no adapter probe (which on a headless machine also logs EGL noise).
        let adapter = if request == DeviceRequest::Cpu {
            None
        } else {
            pick(request, &adapters())?
        };
        let result = match adapter {
            None => ChosenDevice {
                request,
                ..ChosenDevice::cpu()
            },
            Some(adapter) => {
                let mut started = STARTED.get_or_init(Default::default).lock().unwrap();
                let key = (adapter.name.clone(), adapter.api);
                let device = match started.get(&key) {
                    Some(device) => device.clone(),
                    None => {
                        let device = start(&adapter)?;
                        started.insert(key, device.clone());
                        device
                    }
                };
                ChosenDevice {
                    device,
                    request,
                    backend: Backend::Wgpu(adapter),
                }
            }
        };
        chosen.insert(request, result.clone());
        Ok(result)
    }
}

#[cfg(not(target_family = "wasm"))]
pub use native::{adapters, select};

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(name: &str, api: Api, adapter_type: AdapterType, index: usize) -> AdapterReport {
        AdapterReport {
            name: name.into(),
            api,
            adapter_type,
            driver: String::new(),
            index_in_type: index,
        }
    }

    #[test]
    fn parses_every_documented_name_and_rejects_others() {
        for name in DeviceRequest::NAMES.split(", ") {
            let parsed: DeviceRequest = name.parse().unwrap();
            assert_eq!(parsed.to_string(), name);
        }
        let err = "cuda".parse::<DeviceRequest>().unwrap_err().to_string();
        assert!(
            err.contains("unknown device `cuda`") && err.contains("vulkan"),
            "{err}"
        );
    }

    #[cfg(not(target_family = "wasm"))]
    #[test]
    fn auto_prefers_hardware_then_software_then_cpu() {
        use native::pick;
        let lavapipe = adapter(
            "llvmpipe (LLVM 15.0.6, 256 bits)",
            Api::Vulkan,
            AdapterType::Cpu,
            0,
        );
        let gl = adapter("llvmpipe", Api::Gl, AdapterType::Other, 0);
        let gpu = adapter("AMD Radeon", Api::Vulkan, AdapterType::DiscreteGpu, 0);
        let igpu = adapter("Intel Iris", Api::Vulkan, AdapterType::IntegratedGpu, 0);

        let all = [lavapipe.clone(), gl.clone(), igpu.clone(), gpu.clone()];
        assert_eq!(pick(DeviceRequest::Auto, &all).unwrap(), Some(gpu));
        assert_eq!(
            pick(DeviceRequest::Auto, &[lavapipe.clone(), igpu.clone()]).unwrap(),
            Some(igpu)
        );
        assert_eq!(
            pick(DeviceRequest::Auto, &[gl.clone(), lavapipe.clone()]).unwrap(),
            Some(lavapipe.clone())
        );
        assert_eq!(pick(DeviceRequest::Auto, &[]).unwrap(), None);
        assert_eq!(pick(DeviceRequest::Cpu, &[lavapipe.clone()]).unwrap(), None);
        assert!(lavapipe.is_software());
    }

    #[cfg(not(target_family = "wasm"))]
    #[test]
    fn a_missing_api_is_an_error_listing_what_exists() {
        use native::pick;
        let lavapipe = adapter("llvmpipe", Api::Vulkan, AdapterType::Cpu, 0);
        let err = pick(DeviceRequest::Metal, &[lavapipe])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no Metal adapter") && err.contains("llvmpipe on Vulkan"),
            "{err}"
        );
        let err = pick(DeviceRequest::Vulkan, &[]).unwrap_err().to_string();
        assert!(err.contains("mesa-vulkan-drivers"), "{err}");
    }
}
