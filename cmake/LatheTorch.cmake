# Finds libtorch and exposes it as the target lathe::torch: the one in
# CMAKE_PREFIX_PATH or Torch_DIR when either is set, else the wheel of
# LATHE_PYTHON (.venv/bin/python by default).
#
# The PyTorch wheel ships its own copy of protobuf 3.13 headers under
# torch/include/google/, which shadow the system protobuf headers that gRPC
# needs. lathe::torch therefore points at a copy of torch's include folder
# made of symbolic links to every entry except google/. See
# docs/build-and-dependencies.md.
#
# REQUIRES: Protobuf was found before this file is included: Torch's config
# defines protobuf::libprotobuf as an empty alias when no such target exists.

if(NOT TARGET protobuf::libprotobuf)
  message(FATAL_ERROR "find_package(Protobuf) must run before LatheTorch.cmake")
endif()

if(NOT DEFINED Torch_DIR AND NOT CMAKE_PREFIX_PATH)
  find_program(LATHE_PYTHON NAMES python3 PATHS ${CMAKE_SOURCE_DIR}/.venv/bin NO_DEFAULT_PATH)
  if(NOT LATHE_PYTHON)
    find_program(LATHE_PYTHON NAMES python3)
  endif()
  execute_process(
    COMMAND ${LATHE_PYTHON} -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE _lathe_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _lathe_torch_rc)
  if(_lathe_torch_rc EQUAL 0)
    list(APPEND CMAKE_PREFIX_PATH ${_lathe_torch_prefix})
  endif()
endif()

# LATHE_CUDA: the CUDA build (scripts/build.sh with LATHE_CUDA=1). Torch's
# own config finds the CUDA toolkit; point it at /usr/local/cuda* when
# nothing else says where.
if(LATHE_CUDA AND NOT DEFINED CUDAToolkit_ROOT AND NOT DEFINED ENV{CUDA_HOME})
  file(GLOB _lathe_cuda_roots /usr/local/cuda /usr/local/cuda-*)
  if(_lathe_cuda_roots)
    list(GET _lathe_cuda_roots 0 CUDAToolkit_ROOT)
  endif()
endif()
if(LATHE_CUDA AND DEFINED CUDAToolkit_ROOT)
  set(CUDA_TOOLKIT_ROOT_DIR ${CUDAToolkit_ROOT} CACHE PATH "CUDA toolkit (FindCUDA, used by Torch's config)")
  if(NOT CMAKE_CUDA_COMPILER)
    set(CMAKE_CUDA_COMPILER ${CUDAToolkit_ROOT}/bin/nvcc)
  endif()
endif()
# No GPU is needed to build: compile device code for Hopper (sm_90) unless told otherwise.
# The toolkit may lack libraries libtorch's targets name (NVRTC): take them
# from the CUDA wheels next to torch (nvidia/cu13/lib).
if(LATHE_CUDA AND LATHE_PYTHON)
  execute_process(
    COMMAND ${LATHE_PYTHON} -c "import nvidia, os; print(';'.join(os.path.join(p, 'cu13', 'lib') for p in nvidia.__path__))"
    OUTPUT_VARIABLE _lathe_cuda_wheel_libs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 HINTS ${CUDAToolkit_ROOT}/lib64 ${_lathe_cuda_wheel_libs})
endif()
if(LATHE_CUDA AND NOT TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "9.0")
endif()

find_package(Torch REQUIRED)
if(LATHE_CUDA AND NOT TARGET torch_cuda)
  message(FATAL_ERROR "LATHE_CUDA=ON but the libtorch of ${TORCH_INSTALL_PREFIX} has no CUDA "
                      "(torch_cuda not found): build against the CUDA wheel (LATHE_CUDA=1 bash scripts/setup.sh)")
endif()

set(_lathe_torch_inc ${CMAKE_BINARY_DIR}/torch_include)
file(MAKE_DIRECTORY ${_lathe_torch_inc})
file(GLOB _lathe_torch_entries RELATIVE ${TORCH_INSTALL_PREFIX}/include
     ${TORCH_INSTALL_PREFIX}/include/*)
foreach(_e IN LISTS _lathe_torch_entries)
  if(NOT _e STREQUAL "google" AND NOT EXISTS ${_lathe_torch_inc}/${_e})
    file(CREATE_LINK ${TORCH_INSTALL_PREFIX}/include/${_e} ${_lathe_torch_inc}/${_e} SYMBOLIC)
  endif()
endforeach()

foreach(_t torch torch_cpu c10 torch_cuda c10_cuda)
  if(TARGET ${_t})
    set_property(TARGET ${_t} PROPERTY INTERFACE_INCLUDE_DIRECTORIES "")
  endif()
endforeach()

add_library(lathe_torch INTERFACE)
add_library(lathe::torch ALIAS lathe_torch)
target_include_directories(lathe_torch SYSTEM INTERFACE
  ${_lathe_torch_inc} ${_lathe_torch_inc}/torch/csrc/api/include)
target_link_libraries(lathe_torch INTERFACE ${TORCH_LIBRARIES})
