//! With the `cuda` feature, compiles the fused ops' CUDA kernels (`kernels/fused.cu`) to PTX in
//! OUT_DIR with nvcc (found as candle's own kernels find it: CUDA_HOME/PATH, and CUDA_COMPUTE_CAP or
//! the GPU's compute capability). Without the feature there is nothing to do.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    {
        println!("cargo::rerun-if-changed=kernels/fused.cu");
        let ptx =
            cudaforge::KernelBuilder::new().source_files(["kernels/fused.cu"]).args(["-O3", "-std=c++17"]).build_ptx();
        if let Err(error) = ptx {
            panic!("compiling kernels/fused.cu with nvcc: {error} (see scripts/cuda-env.sh)");
        }
    }
}
