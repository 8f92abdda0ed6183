//! The device layer on this machine: what wgpu sees and what portaflow picks.

use portaflow::device::{self, Backend, DeviceRequest};
use portaflow_tests::vulkan;

#[test]
fn vulkan_device_is_a_real_adapter_and_under_ci_the_software_one() {
    let chosen = vulkan();
    let adapter = chosen.adapter().unwrap();
    assert_eq!(adapter.api, device::Api::Vulkan);
    // The adapter must also run work: a tiny sum on it.
    let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0, 3.0], &chosen.device);
    let sum: f32 = t.sum().into_scalar();
    assert_eq!(sum, 6.0);
    println!("vulkan test device: {chosen}");
}

#[test]
fn auto_never_picks_a_software_adapter_over_hardware() {
    let adapters = device::adapters();
    let chosen = device::select(DeviceRequest::Auto).unwrap();
    let hardware = adapters
        .iter()
        .any(|a| !a.is_software() && a.adapter_type != device::AdapterType::Other);
    match chosen.backend {
        Backend::Wgpu(ref adapter) if adapter.is_software() => assert!(!hardware, "{adapters:?}"),
        Backend::Wgpu(_) => {}
        Backend::Flex => assert!(
            adapters
                .iter()
                .all(|a| a.adapter_type == device::AdapterType::Other)
        ),
    }
}

#[test]
fn an_absent_api_is_a_clear_error() {
    let have_metal = device::adapters()
        .iter()
        .any(|a| a.api == device::Api::Metal);
    if !have_metal {
        let err = device::select(DeviceRequest::Metal)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no Metal adapter"), "{err}");
    }
    let err = device::select(DeviceRequest::WebGpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("browser"), "{err}");
}
