// pybind11 half of monet._C: build information. The ops themselves are registered with
// TORCH_LIBRARY (latent_ops.cpp, latent_ops_cuda.cu) and reached through torch.ops.monet.
#include <torch/extension.h>

#ifndef MONET_VERSION
#define MONET_VERSION "unknown"
#endif
#ifndef MONET_TORCH_VERSION
#define MONET_TORCH_VERSION "unknown"
#endif
#ifndef MONET_CUDA_ARCHS
#define MONET_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = MONET_VERSION;
  info["torch_version"] = MONET_TORCH_VERSION;  // the torch it was compiled against
#ifdef MONET_WITH_CUDA
  info["cuda_compiled"] = true;
  info["cuda_archs"] = std::string(MONET_CUDA_ARCHS);
#else
  info["cuda_compiled"] = false;
  info["cuda_archs"] = std::string();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Monet native latent ops (registered as torch.ops.monet.*) and build information";
  m.def("build_info", &build_info, "Build information of the compiled extension");
}
