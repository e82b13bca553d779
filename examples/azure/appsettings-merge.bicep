// Adds settings to an App Service without dropping the ones it has: redis.bicep's helper.
// A Microsoft.Web/sites/config 'appsettings' resource replaces every app setting, so the caller
// reads the current ones (list() of config/appsettings) and passes them in; union() keeps them and
// adds or replaces newAppSettings.

@description('The existing App Service (web app).')
param appServiceName string

@description('Its current app settings: list(\'<site id>/config/appsettings\', \'2022-09-01\').properties. Secure: they hold passwords.')
@secure()
param currentAppSettings object

@description('Settings to add, or to replace when they exist.')
param newAppSettings object

resource appService 'Microsoft.Web/sites@2022-09-01' existing = {
  name: appServiceName
}

resource appSettings 'Microsoft.Web/sites/config@2022-09-01' = {
  parent: appService
  name: 'appsettings'
  properties: union(currentAppSettings, newAppSettings)
}
