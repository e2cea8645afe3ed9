/* The header included twice (include guard), used as a consumer would, with its struct layout
 * pinned: these sizes and offsets are ABI. Compiled with -std=c99 -pedantic -Werror. */
#include <oxcow.h>
#include <oxcow.h>

#define STATIC_ASSERT(name, cond) typedef char static_assert_##name[(cond) ? 1 : -1]

STATIC_ASSERT(create_options_size, sizeof(oxcow_create_options) == 56);
STATIC_ASSERT(create_options_data_file, offsetof(oxcow_create_options, data_file) == 48);
STATIC_ASSERT(create_options_backing, offsetof(oxcow_create_options, backing_file) == 32);
STATIC_ASSERT(open_options_size, sizeof(oxcow_open_options) == 48);
STATIC_ASSERT(open_options_v3, offsetof(oxcow_open_options, refcount_cache_size) == 24);
STATIC_ASSERT(open_options_v4, offsetof(oxcow_open_options, cache_clean_interval) == 40);
STATIC_ASSERT(snapshot_info_size, sizeof(oxcow_snapshot_info) == 432);
STATIC_ASSERT(info_size, sizeof(oxcow_info) == 48 + 1024 + 32);
STATIC_ASSERT(info_backing, offsetof(oxcow_info, backing_file) == 48);
STATIC_ASSERT(extent_size, sizeof(oxcow_extent) == 32);
STATIC_ASSERT(check_result_size, sizeof(oxcow_check_result) == 8 + 10 * 8);
STATIC_ASSERT(open_flags, (OXCOW_OPEN_RDWR | OXCOW_OPEN_NO_BACKING | OXCOW_OPEN_FORCE_SHARE |
                           OXCOW_OPEN_DIRECT | OXCOW_OPEN_WRITETHROUGH) == 31u);
STATIC_ASSERT(open_flag_no_probe, OXCOW_OPEN_NO_PROBE == 64u);
STATIC_ASSERT(version_number, OXCOW_VERSION_NUMBER == OXCOW_VERSION_MAJOR * 10000 +
                                                          OXCOW_VERSION_MINOR * 100 +
                                                          OXCOW_VERSION_PATCH);

int main(void) {
    oxcow_create_options o;
    oxcow_create_options_init(&o);
    return o.struct_size == sizeof o && oxcow_version_number() == OXCOW_VERSION_NUMBER ? 0 : 1;
}
