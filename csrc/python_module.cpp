// Makes the shared library importable as `bayesvlm_ext._C`. Importing it runs the static
// TORCH_LIBRARY registrations of the other translation units; it defines no Python names.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "bayesvlm_ext compiled ops; use them through torch.ops.bayesvlm_ext",
      -1,       // per-interpreter state size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
