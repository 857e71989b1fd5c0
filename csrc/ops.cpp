// Schemas of every operator of the `app` library. Kernels register per device in their own folders
// (TORCH_LIBRARY_IMPL(app, CPU|CUDA, m)); autograd and fake kernels are registered from Python.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(app, m) {
  // Mean of `values` (B, C, H, W) over the pixels of each segment of `segments` (B, H, W), broadcast back
  // to every pixel of that segment (thesis Eq. 4.13). Ids must lie in [0, num_segments).
  m.def("segment_mean(Tensor values, Tensor segments, int num_segments) -> Tensor");
  // ConvCRF message passing (Eq. 6): out[b,c,p] = sum over the filter_size x filter_size window around p,
  // centre excluded, of exp(-1/2 |features[b,:,p] - features[b,:,p']|^2) * q[b,c,p'].
  m.def("gaussian_message(Tensor q, Tensor features, int filter_size) -> Tensor");
  // Gradient of gaussian_message with respect to `features`, given the output gradient `grad` (B, C, H, W).
  m.def("gaussian_message_features_backward(Tensor grad, Tensor q, Tensor features, int filter_size) -> Tensor");
}

// `import app._C` loads this shared library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
