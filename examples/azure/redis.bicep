// Azure Cache for Redis for chat_history_rs's write-back tier, its connection string in Key Vault,
// and the App Service settings that switch the app to it. The seed design's Redis section
// (Phase 2), made safe for write-back; docs/deployment.md walks through it.
//
// Deploy on its own into the resource group of the Phase 1 deployment (the Key Vault and the App
// Service exist already):
//
//   az deployment group create -g <resource-group> -f examples/azure/redis.bicep \
//     -p resourcePrefix=<prefix> keyVaultName=<vault> appServiceName=<web-app>
//
// or as a module of the main template (`module redis 'redis.bicep' = { name: 'redis', params: {...} }`).
// Not compiled where it was written (no Bicep CLI offline): run `az bicep build -f redis.bicep` first.

targetScope = 'resourceGroup'

@description('Prefix of resource names, as in the Phase 1 deployment: the cache is <prefix>-redis.')
param resourcePrefix string

@description('Region of the cache.')
param location string = resourceGroup().location

@description('Basic: one node, no SLA, a restart empties it. Standard: a replica and an SLA. Premium: persistence, VNet.')
@allowed([
  'Basic'
  'Standard'
  'Premium'
])
param skuName string = 'Basic'

@description('C for Basic and Standard, P for Premium.')
@allowed([
  'C'
  'P'
])
param skuFamily string = 'C'

@description('Size within the family: C0 = 250 MB, C1 = 1 GB, C2 = 2.5 GB ...')
@minValue(0)
@maxValue(6)
param skuCapacity int = 0

@description('Enabled, or Disabled when the app reaches the cache through a private endpoint.')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

@description('The existing Key Vault that holds the app\'s secrets; the App Service\'s identity can already read it.')
param keyVaultName string

@description('Name of the Key Vault secret that receives the Redis connection string.')
param secretName string = 'redis-connection-string'

@description('The existing App Service (web app) that runs the chat app.')
param appServiceName string

@description('REDIS_ENABLED for the app: false is the rollback switch (docs/deployment.md, "Rollback").')
param redisEnabled bool = true

@description('REDIS_CACHE_TTL: seconds a clean conversation stays cached after its last use (dirty ones never expire).')
@minValue(1)
param cacheTtlSeconds int = 1800

resource keyVault 'Microsoft.KeyVault/vaults@2023-02-01' existing = {
  name: keyVaultName
}

resource appService 'Microsoft.Web/sites@2022-09-01' existing = {
  name: appServiceName
}

// ======================== Azure Cache for Redis ========================
resource redisCache 'Microsoft.Cache/Redis@2023-08-01' = {
  name: '${resourcePrefix}-redis'
  location: location
  properties: {
    sku: {
      name: skuName
      family: skuFamily
      capacity: skuCapacity
    }
    // TLS only (port 6380), TLS 1.2 at least: the connection string below is rediss://.
    enableNonSslPort: false
    minimumTlsVersion: '1.2'
    publicNetworkAccess: publicNetworkAccess
    redisConfiguration: {
      // NOT the seed's allkeys-lru. With write-back, a conversation saved in Redis and not yet
      // flushed ("dirty") exists nowhere else; allkeys-lru may evict it when memory runs short, and
      // the chat is lost. chat_history_rs removes the TTL of a dirty key and gives it back only
      // once PostgreSQL has the conversation, and volatile-* policies evict only keys that have a
      // TTL: clean cached copies go, unsaved chats stay. When only dirty keys are left, Redis
      // refuses writes and the library saves straight to PostgreSQL instead.
      'maxmemory-policy': 'volatile-lru'
    }
  }
}

// ======================== Connection string in Key Vault ========================
// Azure's URL form, which chat_history_rs reads as is: rediss://:<key>@<host>:6380/0?ssl=true.
// The key is base64 and may hold '/', '+' and '='; uriComponent() percent-encodes it, which
// chat_history_rs (and redis-py, should the seed's Python share the secret) decode.
resource redisConnectionStringSecret 'Microsoft.KeyVault/vaults/secrets@2023-02-01' = {
  parent: keyVault
  name: secretName
  properties: {
    contentType: 'Redis URL (rediss://)'
    value: 'rediss://:${uriComponent(redisCache.listKeys().primaryKey)}@${redisCache.properties.hostName}:${redisCache.properties.sslPort}/0?ssl=true'
  }
}

// ======================== App Service settings ========================
// A Microsoft.Web/sites/config 'appsettings' resource REPLACES every app setting, so the current
// ones are read with list() and merged in a nested module (a list() of the same resource inside
// its own declaration would be a circular dependency).
module appSettings 'appsettings-merge.bicep' = {
  name: '${resourcePrefix}-redis-appsettings'
  params: {
    appServiceName: appService.name
    currentAppSettings: list('${appService.id}/config/appsettings', '2022-09-01').properties
    newAppSettings: {
      REDIS_ENABLED: redisEnabled ? 'true' : 'false'
      // A Key Vault reference: App Service resolves it with the app's managed identity, so the key
      // never appears in the app settings. secretUri has no version: rotations are picked up.
      REDIS_CONNECTION_STRING: '@Microsoft.KeyVault(SecretUri=${redisConnectionStringSecret.properties.secretUri})'
      REDIS_CACHE_TTL: string(cacheTtlSeconds)
    }
  }
}

@description('Host name of the cache (TLS port 6380).')
output redisHostName string = redisCache.properties.hostName

@description('TLS port of the cache.')
output redisSslPort int = redisCache.properties.sslPort

@description('The Key Vault secret holding the connection string (the URI, not the value).')
output redisConnectionStringSecretUri string = redisConnectionStringSecret.properties.secretUri
