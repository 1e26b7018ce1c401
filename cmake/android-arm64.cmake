# Cross-compiling the native runner for Android with the NDK: the NDK's own toolchain file
# (build/cmake/android.toolchain.cmake) with this project's defaults. See device_train/native/README.md
# ("Android"). UNTESTED with a real NDK: no NDK or device was available where it was written.
#
#   export ANDROID_NDK=/path/to/android-ndk-r28c        # or pass -DANDROID_NDK=...
#   cmake -S . -B build/native-android -DBLOCKSKIP_BUILD_NATIVE=ON \
#       -DCMAKE_TOOLCHAIN_FILE=$PWD/cmake/android-arm64.cmake -DEXECUTORCH_ROOT=...
#
# ANDROID_ABI (default arm64-v8a), ANDROID_PLATFORM (default android-26, as ExecuTorch's
# scripts/build_android_library.sh uses) and ANDROID_STL (the NDK's default c++_static) may be given.

if(ANDROID_NDK)
  set(_bs_ndk "${ANDROID_NDK}")
else()
  set(_bs_ndk "$ENV{ANDROID_NDK}")
endif()
if(NOT EXISTS "${_bs_ndk}/build/cmake/android.toolchain.cmake")
  message(FATAL_ERROR "cmake/android-arm64.cmake: set ANDROID_NDK (environment, or -DANDROID_NDK=...) to the "
                      "NDK's root folder (the one holding build/cmake/android.toolchain.cmake); got '${_bs_ndk}'")
endif()
# CMake reads this file again for its compiler checks, where -D values are not passed on but the
# environment is.
set(ENV{ANDROID_NDK} "${_bs_ndk}")

if(NOT ANDROID_ABI)
  set(ANDROID_ABI arm64-v8a)
endif()
if(NOT ANDROID_PLATFORM)
  set(ANDROID_PLATFORM android-26)
endif()

# The NDK makes find_package search only under its sysroot (mode ONLY, unless already set), which
# would re-root the host folder the top-level CMakeLists passes as EXECUTORCH_ROOT and not find the
# ExecuTorch package there. Libraries and headers stay target-only.
if(NOT DEFINED CMAKE_FIND_ROOT_PATH_MODE_PACKAGE)
  set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
endif()

include("${_bs_ndk}/build/cmake/android.toolchain.cmake")
