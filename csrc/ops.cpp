// The `app` library: every operator's schema (csrc/schemas.h). Kernels register per device in their own folders
// (TORCH_LIBRARY_IMPL(app, CPU|CUDA, m)); autograd and fake kernels are registered from Python.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(app, m) {
  m.def(app::schema::kSegmentMean);
  m.def(app::schema::kGaussianMessage);
  m.def(app::schema::kGaussianMessageFeaturesBackward);
  m.def(app::schema::kMessagePassing);
  m.def(app::schema::kMessagePassingBackward);
  m.def(app::schema::kMeanfield);
  m.def(app::schema::kMeanfieldBackward);
}

// `import app._C` loads this shared library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
