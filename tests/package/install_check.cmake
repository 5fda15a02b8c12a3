# cmake -DBUILD_DIR= -DSOURCE_DIR= -DPREFIX= -DCONFIG= -DVERSION= -P install_check.cmake
#
# Installs the build tree into a fresh PREFIX and checks the layout downstream users rely
# on: every header of include/dpo and kernels/dpo under include/dpo, the CMake package
# under share/dpo/cmake, and the version the config file reports.
foreach(_var BUILD_DIR SOURCE_DIR PREFIX VERSION)
  if(NOT DEFINED ${_var})
    message(FATAL_ERROR "install_check.cmake: ${_var} is not set")
  endif()
endforeach()

file(REMOVE_RECURSE "${PREFIX}")
set(_config_args)
if(CONFIG)
  set(_config_args --config "${CONFIG}")
endif()
execute_process(
  COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${_config_args}
  RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "cmake --install ${BUILD_DIR} --prefix ${PREFIX} failed: ${_rc}")
endif()

set(_missing)
foreach(_root include kernels)
  file(GLOB_RECURSE _headers RELATIVE "${SOURCE_DIR}/${_root}"
       "${SOURCE_DIR}/${_root}/dpo/*.hpp" "${SOURCE_DIR}/${_root}/dpo/*.cuh"
       "${SOURCE_DIR}/${_root}/dpo/*.h")
  foreach(_h IN LISTS _headers)
    if(NOT EXISTS "${PREFIX}/include/${_h}")
      list(APPEND _missing "include/${_h} (from ${_root}/${_h})")
    endif()
  endforeach()
endforeach()
foreach(_f include/dpo/dpo.hpp include/dpo/version.hpp share/dpo/cmake/dpoConfig.cmake
           share/dpo/cmake/dpoConfigVersion.cmake share/dpo/cmake/dpoTargets.cmake)
  if(NOT EXISTS "${PREFIX}/${_f}")
    list(APPEND _missing "${_f}")
  endif()
endforeach()
if(_missing)
  list(JOIN _missing "\n  " _list)
  message(FATAL_ERROR "cmake --install did not install:\n  ${_list}")
endif()

# The version file as find_package() evaluates it.
set(PACKAGE_FIND_VERSION "${VERSION}")
string(REPLACE "." ";" _parts "${VERSION}")
list(GET _parts 0 PACKAGE_FIND_VERSION_MAJOR)
list(GET _parts 1 PACKAGE_FIND_VERSION_MINOR)
list(GET _parts 2 PACKAGE_FIND_VERSION_PATCH)
include("${PREFIX}/share/dpo/cmake/dpoConfigVersion.cmake")
if(NOT PACKAGE_VERSION STREQUAL VERSION OR NOT PACKAGE_VERSION_EXACT)
  message(FATAL_ERROR "installed dpoConfigVersion.cmake reports ${PACKAGE_VERSION}, expected ${VERSION}")
endif()

file(GLOB_RECURSE _installed RELATIVE "${PREFIX}" "${PREFIX}/*")
list(LENGTH _installed _count)
message(STATUS "installed ${_count} files into ${PREFIX}")
