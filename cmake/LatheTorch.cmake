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

find_package(Torch REQUIRED)

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
