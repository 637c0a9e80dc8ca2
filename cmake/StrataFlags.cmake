# Compiler flags shared by every strata target.
add_library(strata_flags INTERFACE)
target_compile_options(strata_flags INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wno-missing-field-initializers>)
# Symbols of static archives (protobuf, see proto/CMakeLists.txt) stay private to our binaries.
target_link_options(strata_flags INTERFACE "LINKER:--exclude-libs,ALL")
if(STRATA_WERROR)
  target_compile_options(strata_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
endif()

if(STRATA_SANITIZE STREQUAL "address")
  set(_san -fsanitize=address -fno-omit-frame-pointer)
elseif(STRATA_SANITIZE STREQUAL "undefined")
  set(_san -fsanitize=undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
elseif(STRATA_SANITIZE STREQUAL "thread")
  set(_san -fsanitize=thread)
elseif(NOT STRATA_SANITIZE STREQUAL "")
  message(FATAL_ERROR "STRATA_SANITIZE must be empty, address, undefined or thread (got '${STRATA_SANITIZE}')")
endif()
if(_san)
  target_compile_options(strata_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:${_san}>)
  target_link_options(strata_flags INTERFACE ${_san})
endif()

# strata_add_library(name SOURCES ... DEPS ...): a static library of one layer.
function(strata_add_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_link_libraries(${name} PUBLIC strata_flags ${ARG_DEPS})
endfunction()
