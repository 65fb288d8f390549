# Folders are the modules, and the build keeps their dependencies a DAG.
#
# There is no project-wide include path. Each folder F has an include root,
# <build>/include/F, holding one link: F -> <source>/F. A library of F adds
# that root to its PUBLIC include directories (lathe_module), so a source
# file sees "F/x.h" exactly when its target links, directly or through its
# dependencies, a library of F. An include across folders that the targets'
# links do not allow fails to compile.

# Sets <out> to the include root of <folder>, creating it on first use.
function(lathe_module_root folder out)
  set(root ${CMAKE_BINARY_DIR}/include/${folder})
  if(NOT IS_SYMLINK ${root}/${folder})
    file(MAKE_DIRECTORY ${root})
    file(CREATE_LINK ${CMAKE_SOURCE_DIR}/${folder} ${root}/${folder} SYMBOLIC)
  endif()
  set(${out} ${root} PARENT_SCOPE)
endfunction()

# Makes <target> a library of <folder>: it and its dependents see "<folder>/x.h".
function(lathe_module target folder)
  lathe_module_root(${folder} root)
  target_include_directories(${target} PUBLIC ${root})
endfunction()
